"""The shape of a Llama-family model, read from its Hugging Face `config.json`.

Llama, Mistral and Qwen2 share one architecture; what differs between them is data:
Qwen2 has biases on q/k/v, some models set `head_dim` apart from hidden / heads, and the
end-of-sequence tokens come from `config.json` and `generation_config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
    pass


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

    @classmethod
    def from_hf(cls, cfg: dict, generation_cfg: dict | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architecture {archs} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise UnsupportedModelError(f"rope type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        num_heads = cfg["num_attention_heads"]
        eos: list[int] = []
        for source in (cfg, generation_cfg or {}):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                value = [value]
            for token in value or []:
                if token not in eos:
                    eos.append(token)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", "Qwen2" in "".join(archs)),
            eos_token_ids=tuple(eos),
        )

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection LoRA can target, by short name."""
        h, i = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "lm_head": (h, self.vocab_size),
        }
