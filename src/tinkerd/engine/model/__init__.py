"""The model: one decoder for every supported family (Llama 2/3.x, Mistral, Qwen2, Qwen3, Qwen3
MoE), with multi-adapter LoRA and a slot-based KV cache.

    config.py    ModelConfig, read from a Hugging Face config.json (unsupported settings refused)
    llama.py     the module tree (LlamaModel → DecoderLayer → Attention, MLP or SparseMoe) and
                 the kinds of pass it runs: causal (training, scoring, prefill) and decode steps
    moe.py       a routed mixture of experts, grouped by expert, LoRA on each expert
    weights.py   the safetensors shards, loaded one tensor at a time into the engine's dtype
    lora.py      adapters, LoraLinear (a frozen projection plus each row's LoRA update),
                 which rows use which adapter, and grouped LoRA for decode steps
    kv_cache.py  the sampler's K/V cache

One frozen base model is shared by every tenant; adapters are applied per batch row, so
one forward pass can mix rows of many adapters.
"""

from tinkerd.engine.model.config import (
    ATTN_MODULES,
    MLP_MODULES,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedModelError,
)
from tinkerd.engine.model.kv_cache import KVCache
from tinkerd.engine.model.llama import LlamaModel
from tinkerd.engine.model.lora import (
    AdapterBatch,
    AdapterSegment,
    FusedLoraLinear,
    FusedStacks,
    GroupedLora,
    LoraLinear,
    LoraStacks,
    LoraWeights,
    init_lora,
    lora_module_paths,
)

__all__ = [
    "ATTN_MODULES",
    "MLP_MODULES",
    "SUPPORTED_ARCHITECTURES",
    "AdapterBatch",
    "AdapterSegment",
    "FusedLoraLinear",
    "FusedStacks",
    "GroupedLora",
    "KVCache",
    "LlamaModel",
    "LoraLinear",
    "LoraStacks",
    "LoraWeights",
    "ModelConfig",
    "UnsupportedModelError",
    "init_lora",
    "lora_module_paths",
]
