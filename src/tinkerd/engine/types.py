"""Plain values exchanged with the engine (no torch here, so the API layer can use them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LORA_ALPHA = 32.0


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False


class UserInputError(ValueError):
    """The request is wrong (the caller's fault): reported as a `user` failure."""


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int = 0
    alpha: float = LORA_ALPHA


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [N] model input
    inputs: dict[str, np.ndarray]  # dense loss_fn_inputs; target_tokens int64, others float32
    # Provenance (StableReinforce): runs of (kind "prompt"|"sampled", sequence_id, offset, length)
    # tiling model_input and target_tokens.
    model_input_spans: list[tuple[str, str, int, int]] | None = None
    loss_fn_input_spans: list[tuple[str, str, int, int]] | None = None
    # Filled in by the core from recorded samples: per-target sampler logprob and sampled mask.
    stability: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class TrainResult:
    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # NaN at position 0
    topk_prompt_ids: list[list[int]] | None = None
    topk_prompt_logprobs: list[list[float]] | None = None


@dataclass
class AdapterRef:
    """A sampler adapter: `key` names it in the cache, `directory` holds its PEFT files."""

    key: str
    directory: Path


@dataclass
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter: AdapterRef | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    record_stability_info: bool = False
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt tokens
    on_token: Callable[[int, int, float], None] | None = None  # (sample_index, token, logprob), streaming
    # Streaming extras: the new token's top-k (sample_index, ids, logprobs), called just before
    # on_token when topk_sample_logprobs > 0; and a poll after each token — True ends that
    # sample early with stop_reason "stop" (its client went away, or it hit a stop the caller found).
    on_token_topk: Callable[[int, list[int], list[float]], None] | None = None
    is_cancelled: Callable[[int], bool] | None = None




@dataclass
class ForwardBackwardCall:
    """One forward_backward / forward request; the engine may run calls of different adapters in one pass."""

    adapter_id: str
    datums: list[Datum]
    loss_fn: str
    config: dict
    forward_only: bool
