"""The shape of a supported model, read from its Hugging Face `config.json`.

One decoder definition (llama.py) serves every supported family; what differs between them
is data read here:

    Llama 2 / 3.x, Mistral, SmolLM   the plain decoder; Llama 3.x scales its rotary
                                     frequencies (`rope_type: "llama3"`)
    Qwen2 / 2.5                      biases on q/k/v
    Qwen3                            RMSNorm of each q and k head before rotary; `head_dim`
                                     apart from hidden / heads
    Qwen3 MoE                        Qwen3's attention; a routed mixture of experts in place
                                     of the MLP (all layers, or those `decoder_sparse_step`
                                     and `mlp_only_layers` pick)

Any setting the decoder does not implement is refused here, naming the field and what is
supported: a model that loads computes what transformers computes for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
)
_QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's rotary frequency scaling: long wavelengths divided by `factor`, short ones
    kept, the band between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MoeConfig:
    """A routed mixture of SwiGLU experts (Qwen3 MoE): each token goes to `top_k` of
    `num_experts` experts, weighted by the router's softmax (renormalised over the chosen
    ones when `norm_topk_prob`)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    layers: tuple[int, ...]  # the layers with experts; the others keep a dense MLP


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    qk_norm: bool = False  # Qwen3: RMSNorm of each q and k head before rotary
    llama3_rope: Llama3Rope | None = None
    moe: MoeConfig | None = None
    sliding_window: int | None = None  # attention window; the served context stops there

    @property
    def max_context(self) -> int:
        """The longest sequence served. A sliding window is not implemented as such: up to
        the window's length, windowed attention is full attention, so the context stops there."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    @classmethod
    def from_hf(cls, cfg: dict, generation_cfg: dict | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            _refuse("architectures", archs, f"one of {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "?")
            _refuse("quantization_config", method, "unquantized weights (bf16, fp16 or fp32)")
        if cfg.get("hidden_act", "silu") != "silu":
            _refuse("hidden_act", cfg["hidden_act"], "silu")
        if cfg.get("mlp_bias"):
            _refuse("mlp_bias", True, "false")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        theta, llama3 = _rope(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            eos_token_ids=_eos_tokens(cfg, generation_cfg),
            architecture=arch,
            qk_norm=arch in _QK_NORM_ARCHITECTURES,
            llama3_rope=llama3,
            moe=_moe(cfg) if arch == "Qwen3MoeForCausalLM" else None,
            sliding_window=_sliding_window(cfg),
        )

    def lora_shape(self, path: str) -> tuple[int, int]:
        """(in_features, out_features) of the projection at module path `path`
        (`model.layers.3.self_attn.q_proj`, `model.layers.3.mlp.experts.7.down_proj`, `lm_head`)."""
        h = self.hidden_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        name = path.rsplit(".", 1)[-1]
        mlp = self.moe.intermediate_size if ".mlp.experts." in path and self.moe else self.intermediate_size
        shapes = {
            "q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, mlp), "up_proj": (h, mlp), "down_proj": (mlp, h), "lm_head": (h, self.vocab_size),
        }
        return shapes[name]


def _refuse(field: str, value: object, supported: str) -> None:
    raise UnsupportedModelError(f"config.json: {field} = {value!r} is not supported (supported: {supported})")


def _rope(cfg: dict) -> tuple[float, Llama3Rope | None]:
    """(rope_theta, Llama 3 scaling or None), from either spelling transformers has used:
    `rope_scaling` beside `rope_theta` (transformers 4), or one `rope_parameters` dict holding
    both (transformers 5). Where a config has both, `rope_scaling` wins and `rope_parameters`
    is ignored, as transformers reads it."""
    if cfg.get("rope_scaling"):
        params, field = dict(cfg["rope_scaling"]), "rope_scaling"
    else:
        params, field = dict(cfg.get("rope_parameters") or {}), "rope_parameters"
    if any(isinstance(value, dict) for value in params.values()):
        _refuse(field, "per layer type", "one set of rotary parameters for every layer")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        _refuse(f"{field}.rope_type", rope_type, ", ".join(SUPPORTED_ROPE_TYPES))
    partial = params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        _refuse("partial_rotary_factor", partial, "1.0")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    try:
        return theta, Llama3Rope(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise UnsupportedModelError(f"config.json: {field} of rope_type 'llama3' lacks {missing}") from None


def _moe(cfg: dict) -> MoeConfig:
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if not experts:
        _refuse("num_experts", experts, "a positive number of experts")
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    layers = tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)
    return MoeConfig(
        num_experts=int(experts),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        layers=layers,
    )


def _sliding_window(cfg: dict) -> int | None:
    """The attention window a config asks for, or None. Qwen2/3 configs carry a window size
    with `use_sliding_window: false`; Mistral's has no such switch."""
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        return None
    if not window or window >= cfg.get("max_position_embeddings", 2048):
        return None
    log.warning("config.json asks for sliding-window attention (%d tokens): serving contexts of up to %d tokens, "
                "where it equals full attention", window, window)
    return int(window)


def _eos_tokens(cfg: dict, generation_cfg: dict | None) -> tuple[int, ...]:
    eos: list[int] = []
    for source in (cfg, generation_cfg or {}):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            value = [value]
        for token in value or []:
            if token not in eos:
                eos.append(token)
    return tuple(eos)
