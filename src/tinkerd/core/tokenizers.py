"""The tokenizer of a served base model, for the front doors (prompts, chat, text out).

Loaded from the model's directory with the fast tokenizer class alone: `AutoTokenizer`
would import transformers' model configuration code, and with it torch, which the API
process does not need. The tokenizer files (tokenizer.json, tokenizer_config.json with its
chat template) give the same tokens and the same rendered chat as `AutoTokenizer`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tinkerd.types import ModelInfo


@cache
def _load(model_dir: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def tokenizer_of(info: ModelInfo) -> Any:
    return _load(info.model_dir)
