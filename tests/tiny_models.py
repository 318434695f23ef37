"""Tiny random-weight models of every supported family, built through transformers.

Nothing is downloaded: each model is `AutoModelForCausalLM.from_config` of a small config
of its family, with its weights nudged away from their initial values (norm weights of 1
and zero biases would hide a missing norm or bias). `save_model` writes one as a Hugging
Face directory with the default model's tokenizer, for a server to load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe")
DENSE_FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3")


def config(family: str, vocab_size: int = 320):
    """A small transformers config of `family`."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(_COMMON, vocab_size=vocab_size)
    if family == "llama2":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "llama3":  # Llama 3.2's shape of config: llama3 rope scaling, tied embeddings
        return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":  # head_dim apart from hidden / heads, q/k norms, tied embeddings as Qwen3-0.6B
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if family == "qwen3_moe":  # 8 experts, top 2; layer 1 keeps a dense MLP (mlp_only_layers)
        return Qwen3MoeConfig(**common, head_dim=32, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)
    raise ValueError(family)


def build(family: str, vocab_size: int = 320, seed: int = 0):
    """A transformers model of `family` in float32, eval mode, with random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, vocab_size), dtype=torch.float32).eval()
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def tinkerd_model(hf_model):
    """tinkerd's model holding the same weights as the transformers model `hf_model`."""
    from tinkerd.engine.model import LlamaModel, ModelConfig

    weights = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
    return LlamaModel(ModelConfig.from_hf(hf_model.config.to_dict()), weights)


def save_model(family: str, target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A Hugging Face directory of a tiny `family` model whose vocabulary is the tokenizer's
    of `tokenizer_dir` (the default model's), with that tokenizer and chat template."""
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    model = build(family, vocab_size, seed)
    model.save_pretrained(str(target))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, target / name)
    generation = tokenizer_dir / "generation_config.json"
    if generation.exists():  # the tokenizer's end-of-sequence tokens
        shutil.copyfile(generation, target / "generation_config.json")
    return target
