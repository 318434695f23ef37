"""Test-harness shim for tinker-cookbook recipes run against tinkerd (never part of tinkerd).

The acceptance tests put this directory on PYTHONPATH of each recipe subprocess, so Python
imports it at start-up. It teaches tinker-cookbook 0.6.1 about the default model,
HuggingFaceTB/SmolLM2-135M-Instruct, which its hard-coded model table does not list:

* a model-table entry, so `model_info.get_model_attributes` / `get_recommended_renderer_name`
  answer instead of raising "Unknown model" (recommended renderer: `qwen3_instruct`, which
  renders exactly SmolLM2's ChatML template);
* when TINKERD_SHIM_TOKENIZER_DIR names a local model directory, a tokenizer factory that
  loads from it, so no recipe needs the hub (the HF cache under HF_HOME also works).

Every cookbook module calls these through the module (`model_info.get_model_attributes`),
so replacing the module attribute at start-up is enough. Failures here only warn: a recipe
that then fails says why on its own.
"""

from __future__ import annotations

import os
import sys

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _install() -> None:
    from tinker_cookbook import model_info, tokenizer_utils

    smollm2 = model_info.ModelAttributes(
        organization="HuggingFaceTB",
        version_str="2",
        size_str="135M",
        is_chat=True,
        recommended_renderers=("qwen3_instruct", "role_colon"),
    )
    original = model_info.get_model_attributes

    def get_model_attributes(model_name: str) -> model_info.ModelAttributes:
        if model_name.split(":", 1)[0] == MODEL:
            return smollm2
        return original(model_name)

    get_model_attributes.__wrapped__ = original  # type: ignore[attr-defined]
    model_info.get_model_attributes = get_model_attributes

    tokenizer_dir = os.environ.get("TINKERD_SHIM_TOKENIZER_DIR")
    if tokenizer_dir:
        loaded: list = []

        def load_tokenizer():
            if not loaded:
                from transformers import AutoTokenizer

                loaded.append(AutoTokenizer.from_pretrained(tokenizer_dir))
            return loaded[0]

        tokenizer_utils.register_tokenizer(MODEL, load_tokenizer)


try:
    _install()
except ImportError:
    pass  # not the cookbook's environment (e.g. pip running with this PYTHONPATH)
except Exception as exc:  # noqa: BLE001 - a broken shim must not hide the recipe's own error
    print(f"tinkerd acceptance shim: not installed: {exc!r}", file=sys.stderr)
