"""The vocabulary every layer speaks: plain, picklable values, and the user-error class.

These are what cross the engine's door (`engine/client.py`): token lists, floats, numpy
arrays, loss names and adapter references in; results of the same kind out. No torch
here, so `api/` and `core/` can use them without loading it, and a remote engine (a Ray
actor) can receive and return them as they are.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

LORA_ALPHA = 32.0


@dataclass
class SamplingParams:
    max_tokens: int | None  # None until core/sampling.py fills in the door's default
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False


class UserError(ValueError):
    """The request is wrong (the caller's fault), whichever layer finds it.

    The Tinker door reports it as a `user`-category failure (or HTTP 400 when the request
    itself is refused), the OpenAI door as a 400 whose `param` is `field` when known.
    """

    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(UserError):
    """An unknown id, name or path (HTTP 404)."""

    status = 404


class EngineFailed(RuntimeError):
    """The engine of a base model stopped while it held the request (a remote engine's
    process died). Not the caller's fault: the engine comes back, and the request may be
    sent again."""


@dataclass(frozen=True)
class ModelInfo:
    """What the front doors need to know of a served base model, without the model.

    `model_dir` holds its tokenizer files (and chat template); the doors load the
    tokenizer from there themselves (`core/tokenizers.py`).
    """

    name: str
    model_dir: str
    max_context: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


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
    prompt_cache_hit_tokens: int = 0  # prompt tokens whose K/V came from the sampler's prefix cache


@dataclass(frozen=True)
class AdapterRef:
    """A sampler adapter: `key` names it in the engine's cache, `directory` holds its PEFT files.

    `key` names one set of weights and never two: anything kept per weights (the adapter
    cache, a prompt-prefix cache) keys by it.

    In-flight weights (`save_weights_and_get_sampling_client(kind="inflight")`): the weights a
    training model last published for its in-flight sampling clients, held only in the
    engine's memory (`directory` is empty). `inflight_of` is the training model's id and
    `version` counts its in-flight saves: every save publishes a new version under a new
    key, `inflight:{model_id}#{version}`, even when no optimizer step ran in between. The
    engine serves a request the newest version published for `inflight_of` (never an older
    one than the request names) and, once it has chosen, puts that version's ref on the
    request (`SampleRequest.adapter`), so what the request ran on is always its `key`.
    """

    key: str
    directory: str
    inflight_of: str | None = None  # the training model whose in-flight weights these are
    version: int = 0  # the in-flight save that published them (1, 2, ...); 0 for a checkpoint


@dataclass
class SampleRequest:
    """One prompt, `num_samples` samples. `request_id` names it for `EngineClient.cancel`.

    Checked and completed (max_tokens filled in) by `core/sampling.py` before it reaches
    the engine, which trusts it.
    """

    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter: AdapterRef | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    record_stability_info: bool = False
    prompt_logprobs_last_n: int | None = None  # score only the last N prompt tokens
    request_id: str = ""
    tenant: str = ""  # whose request: the engine shares admission and decode steps fairly between tenants


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, streamed while its request runs (OpenAI `stream`)."""

    sample_index: int
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] | None = None  # the top-k alternatives, when asked for


@dataclass
class ForwardBackwardCall:
    """One forward_backward / forward request; the engine may run calls of different adapters in one pass."""

    adapter_id: str
    datums: list[Datum]
    loss_fn: str
    config: dict
    forward_only: bool


@dataclass(frozen=True)
class LatencyHistogram:
    """Observations of one latency, bucketed: `counts[i]` of them were at most `bounds[i]`
    seconds and more than the bound before (the last count: above every bound)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total_seconds: float


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine: what it is, what it is doing now, and counters since it
    started. Read by /metrics and the server status; cheap to take at any time."""

    device: str
    dtype: str
    queued_jobs: int  # training, checkpoint and other jobs waiting for the engine thread
    samples_waiting: int  # sample requests not yet admitted into the decode batch
    sample_rows_running: int  # sequences decoding now
    adapters_trainable: int
    adapters_cached: int  # sampler checkpoints held in memory
    memory_bytes: int  # on the engine's device: CUDA memory allocated, else the process's resident set
    counters: dict[str, int]  # decode_steps, prefill_tokens, decode_tokens, train_tokens, adapter_cache_{hits,misses,evictions}
    latencies: dict[str, LatencyHistogram]  # time_to_first_token, decode_step, forward_backward, optim_step


def mark_started(future: Future, when: float | None = None) -> None:
    """Note on a request's future when the engine began its work (time.monotonic(); default:
    now). The core reads it back with `started_at` for the session's trace (core/traces.py):
    the time before it is the request's wait in the engine's queue."""
    future.tinkerd_started = time.monotonic() if when is None else when  # type: ignore[attr-defined]


def started_at(future: Future) -> float | None:
    """When the engine began the work of `future`'s request (None: the engine did not say)."""
    return getattr(future, "tinkerd_started", None)
