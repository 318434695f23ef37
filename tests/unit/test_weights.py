"""The streaming weight loader against what transformers saved: one file, index-listed shards,
a bare set of shards, dtype conversion, and the directories it must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinkerd.engine.model.config import UnsupportedModelError
from tinkerd.engine.model.weights import INDEX_FILE, SINGLE_FILE, load_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def saved(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


def assert_same_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


def test_a_single_file_loads_the_state_dict(tiny_llama, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "single")
    assert (model_dir / SINGLE_FILE).is_file()
    assert_same_tensors(load_weights(model_dir, CPU, torch.float32, progress=False), tiny_llama.state_dict())


def test_index_listed_shards_load_the_state_dict_and_nothing_else(tiny_llama, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "sharded", max_shard_size="20KB")
    shards = set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) > 1 and not (model_dir / SINGLE_FILE).exists()
    # A stray safetensors file beside the shards (an adapter, a leftover) is not the model's.
    save_file({"stray.weight": torch.ones(2)}, str(model_dir / "stray.safetensors"))
    assert_same_tensors(load_weights(model_dir, CPU, torch.float32, progress=False), tiny_llama.state_dict())


def test_without_an_index_every_safetensors_file_is_read(tiny_llama, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "bare", max_shard_size="20KB")
    (model_dir / INDEX_FILE).unlink()
    assert_same_tensors(load_weights(model_dir, CPU, torch.float32, progress=False), tiny_llama.state_dict())


def test_floating_tensors_take_the_dtype_and_integer_tensors_keep_theirs(tmp_path):
    floats = torch.randn(4, 8)
    ids = torch.arange(6, dtype=torch.int64)
    save_file({"proj.weight": floats, "position_ids": ids}, str(tmp_path / SINGLE_FILE))
    loaded = load_weights(tmp_path, CPU, torch.bfloat16, progress=True)  # the bar is off: not a terminal
    assert loaded["proj.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["proj.weight"], floats.to(torch.bfloat16))
    assert loaded["position_ids"].dtype == torch.int64 and torch.equal(loaded["position_ids"], ids)


def test_a_shard_missing_from_the_index_is_named(tiny_llama, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "incomplete", max_shard_size="20KB")
    missing = sorted(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (model_dir / missing).unlink()
    with pytest.raises(UnsupportedModelError, match=missing.replace(".", r"\.")):
        load_weights(model_dir, CPU, torch.float32, progress=False)


def test_a_directory_without_safetensors_is_refused(tiny_llama, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "empty")
    (model_dir / SINGLE_FILE).unlink()
    with pytest.raises(UnsupportedModelError, match="no .safetensors weights"):
        load_weights(model_dir, CPU, torch.float32, progress=False)
