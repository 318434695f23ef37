"""`tinkerd serve --model NAME=DIR`: a local directory served under a public name, driven by the
unmodified tinker SDK that knows the model only by that name (tokenizer included, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from tinker import types

from tinkerd_testing import REPO, Server, free_port

NAME = "myorg/tiny-llama"
CONTEXT = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny_llama_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer (so its vocabulary size)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    default = json.loads((model_dir / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=default["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
        bos_token_id=default["bos_token_id"], eos_token_id=default["eos_token_id"], pad_token_id=default["pad_token_id"],
    )
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(target))
    for fname in TOKENIZER_FILES:
        if (model_dir / fname).exists():
            shutil.copyfile(model_dir / fname, target / fname)
    return target


@pytest.fixture(scope="module")
def named_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # The entry an earlier run seeded goes first, so the tokenizer check sees this server's seeding.
    shutil.rmtree(Path(os.environ["HF_HOME"]) / "hub" / ("models--" + NAME.replace("/", "--")), ignore_errors=True)
    srv = Server(tiny_llama_dir, tmp_path_factory.mktemp("named") / "data", model_name=NAME).start()
    yield srv
    srv.stop()


def test_capabilities_list_the_model_by_its_public_name(named_server):
    caps = tinker.ServiceClient(base_url=named_server.base_url).get_server_capabilities()
    models = {m.model_name: m for m in caps.supported_models}
    assert list(models) == [NAME]
    assert models[NAME].max_context_length == CONTEXT


def test_the_sdk_trains_the_model_by_name_with_its_tokenizer_offline(named_server, tokenizer):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    sc = tinker.ServiceClient(base_url=named_server.base_url)
    tc = sc.create_lora_training_client(base_model=NAME, rank=4)
    assert tc.get_info().model_data.model_name == NAME
    tok = tc.get_tokenizer()  # loaded by the name from the HF cache the server seeded
    text = "Q: What is two plus two?\nA: Four."
    assert tok.encode(text) == tokenizer.encode(text)
    ids = tok.encode(text)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )
    fb = tc.forward_backward([datum], "cross_entropy").result()
    assert fb.metrics["loss:sum"] > 0
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_a_name_for_a_missing_directory_stops_serve_naming_the_path(tmp_path):
    missing = tmp_path / "nonexistent"
    proc = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
         "--model", f"name={missing}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
