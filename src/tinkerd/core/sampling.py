"""The one way into sampling, for both front doors.

The Tinker `SamplingClient` and the OpenAI routes both come through here: a model name or
`tinker://` path is resolved to an engine and an adapter once (`resolve`), a request is
checked and completed once (`check`: prompt tokens, context length, the default
max_tokens, temperature, top_p, top_k, stops, samples per request, top-k logprobs, and
the sizes below), and submitted to the engine's door (`submit`). A failed check is a
`UserError` whose `field` names the offending value in this module's words ("prompt",
"max_tokens", "temperature", "top_p", "top_k", "stop", "num_samples",
"topk_prompt_logprobs", "topk_sample_logprobs", "prompt_logprobs_last_n", "model"); each
door renders it in its own error shape and its own field names
(`sampling_params.temperature`, OpenAI's `n`, ...).

Every size a client controls is bounded here, before the request reaches the engine's
shared batch: one request's values must never fail (or exhaust) the rows of everyone else.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tinkerd.core.access import User
from tinkerd.types import AdapterRef, ModelInfo, NotFound, SampleRequest, TokenEvent, UserError

if TYPE_CHECKING:
    from tinkerd.engine.client import EngineClient

MAX_SAMPLES_PER_REQUEST = 128
# Alternatives per position in top-k logprobs. Each one is kept for every sampled (or
# prompt) position until the result is delivered, so the vocabulary is no useful bound.
MAX_TOPK_LOGPROBS = 256
# Tokens one request may sample in all (num_samples x max_tokens): 128 samples of an 8k context.
MAX_SAMPLED_TOKENS = 1 << 20
# Top-k entries one request may produce in all (positions x k, prompt and samples together):
# the result holds each as a Python (id, logprob) pair, ~70 bytes, so ~300 MB at most.
MAX_TOPK_ENTRIES = 1 << 22


class InflightWeights:
    """The one mutable weights target that a training model's in-flight sampling clients share
    (`save_weights_and_get_sampling_client(kind="inflight")`).

    Each in-flight save is numbered (`next_ref`, in the model's request order) and, once the
    engine holds its copy of the weights, `published`: from then on every sample of every
    in-flight client of the model asks for at least that version. The weights themselves
    live only in the engine (`EngineClient.publish_inflight`); this is their newest name.
    """

    def __init__(self, model_id: str):
        self.model_id = model_id
        self._issued = 0
        self.ref: AdapterRef | None = None  # the newest version published

    def next_ref(self) -> AdapterRef:
        self._issued += 1
        return AdapterRef(f"inflight:{self.model_id}#{self._issued}", "", inflight_of=self.model_id, version=self._issued)

    def published(self, ref: AdapterRef) -> None:
        if self.ref is None or self.ref.version < ref.version:  # saves complete in order; kept monotonic regardless
            self.ref = ref


@dataclass(frozen=True)
class SampleTarget:
    """What a model name means: a base model's engine, and the checkpoint's adapter if any
    (or, for an in-flight client, the shared weights target whose newest version it samples)."""

    base_model: str
    engine: EngineClient
    adapter: AdapterRef | None
    inflight: InflightWeights | None = None

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def current_adapter(self) -> AdapterRef | None:
        """The adapter a request submitted now asks for."""
        if self.inflight is not None and self.inflight.ref is not None:
            return self.inflight.ref
        return self.adapter


class Sampling:
    def __init__(self, engines: dict[str, EngineClient], adapter_for_path: Callable[[str, User], tuple[str, AdapterRef]]):
        self.engines = engines
        self._adapter_for_path = adapter_for_path

    def resolve(self, model: str, user: User) -> SampleTarget:
        """A served base model's name, or a checkpoint path `user` may read (its files checked
        here, so a damaged checkpoint fails now, naming itself). Raises NotFound / UserError(field="model")."""
        if not model.startswith("tinker://"):
            return SampleTarget(model, self.engine_for(model), None)
        base_model, adapter = self._adapter_for_path(model, user)
        engine = self.engines.get(base_model)
        if engine is None:
            raise NotFound(f"{model} needs base model {base_model!r}, which this server does not serve", field="model")
        return SampleTarget(base_model, engine, adapter)

    def engine_for(self, base_model: str) -> EngineClient:
        """The engine of a served base model, or a UserError listing the served ones."""
        engine = self.engines.get(base_model)
        if engine is None:
            raise UserError(f"unknown base model {base_model!r}; this server serves: {', '.join(self.engines)}", field="model")
        return engine

    def submit(
        self, target: SampleTarget, request: SampleRequest, on_token: Callable[[TokenEvent], None] | None = None
    ) -> Future:
        """Submit a checked request to the target's engine; gives it a request id if it has none."""
        if not request.request_id:
            request.request_id = f"smp-{uuid.uuid4().hex}"
        request.adapter = target.current_adapter()
        return target.engine.sample(request, on_token)

    def cancel(self, target: SampleTarget, request_id: str, sample_index: int | None = None) -> None:
        target.engine.cancel(request_id, sample_index)


def check(
    info: ModelInfo,
    request: SampleRequest,
    *,
    prompt_label: str = "prompt",
    default_max_tokens: int | None = None,
    refuse_overflow: bool = False,
    min_max_tokens: int = 0,
) -> SampleRequest:
    """The request, checked against the model, with max_tokens filled in.

    `default_max_tokens`: when the request names none, at most this many (None: the rest
    of the context). A max_tokens past the end of the context is cut to fit, or refused
    with `refuse_overflow` (OpenAI's behaviour). `prompt_label` is how messages name the
    prompt ("prompt[2]", "messages").
    """
    check_prompt(info, request.prompt, prompt_label)
    n = request.num_samples
    if not (1 <= n <= MAX_SAMPLES_PER_REQUEST):
        raise UserError(f"must be between 1 and {MAX_SAMPLES_PER_REQUEST}, got {n}", field="num_samples")
    max_k = min(MAX_TOPK_LOGPROBS, info.vocab_size)
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        k = getattr(request, name)
        if not (0 <= k <= max_k):
            raise UserError(f"must be between 0 and {max_k}, got {k}", field=name)
    last_n = request.prompt_logprobs_last_n
    if last_n is not None and last_n < 0:
        raise UserError(f"must be >= 0 (or absent for the whole prompt), got {last_n}", field="prompt_logprobs_last_n")
    prompt_topk_entries = len(request.prompt) * request.topk_prompt_logprobs
    if prompt_topk_entries > MAX_TOPK_ENTRIES:
        raise UserError(
            f"{len(request.prompt)} prompt tokens x {request.topk_prompt_logprobs} alternatives is more than "
            f"{MAX_TOPK_ENTRIES} top-k entries in one request",
            field="topk_prompt_logprobs",
        )
    params = request.params
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise UserError(f"must be a number >= 0, got {params.temperature}", field="temperature")
    if not (0.0 < params.top_p <= 1.0):
        raise UserError(f"must be in (0, 1], got {params.top_p}", field="top_p")
    if params.top_k < -1:
        raise UserError(f"must be -1 or 0 (off) or >= 1, got {params.top_k}", field="top_k")
    if any(not s for s in params.stop_strings):
        raise UserError("stop sequences must be non-empty strings", field="stop")
    room = info.max_context - len(request.prompt)
    # What the request may sample, per sample, within the totals above.
    per_sample = MAX_SAMPLED_TOKENS // n
    k = request.topk_sample_logprobs
    if k:
        per_sample = min(per_sample, (MAX_TOPK_ENTRIES - prompt_topk_entries) // (n * k))
    max_tokens = params.max_tokens
    if max_tokens is None:
        # Absent means "as long as it takes": up to the end of the context, within the totals.
        max_tokens = min(room, per_sample) if default_max_tokens is None else min(default_max_tokens, room, per_sample)
    elif max_tokens < min_max_tokens:
        raise UserError(f"must be >= {min_max_tokens}, got {max_tokens}", field="max_tokens")
    elif max_tokens > room:
        if refuse_overflow:
            raise UserError(
                f"this model's maximum context length is {info.max_context} tokens, but you requested "
                f"{len(request.prompt) + max_tokens} tokens ({len(request.prompt)} in the prompt, {max_tokens} for the completion)",
                field="max_tokens",
            )
        max_tokens = room
    if max_tokens > per_sample:
        if n * max_tokens > MAX_SAMPLED_TOKENS:
            raise UserError(
                f"{n} samples x {max_tokens} tokens is more than {MAX_SAMPLED_TOKENS} sampled tokens in one request",
                field="max_tokens",
            )
        raise UserError(
            f"{n} samples x {max_tokens} tokens x {k} alternatives (plus the prompt's top-k) is more than "
            f"{MAX_TOPK_ENTRIES} top-k entries in one request",
            field="topk_sample_logprobs",
        )
    return replace(request, params=replace(params, max_tokens=max_tokens))


def check_prompt(info: ModelInfo, prompt: list[int], label: str = "prompt") -> None:
    if not prompt:
        raise UserError(f"{label} is empty", field="prompt")
    bad = next((t for t in prompt if not (0 <= t < info.vocab_size)), None)
    if bad is not None:
        raise UserError(f"{label} contains token id {bad}, outside the vocabulary [0, {info.vocab_size})", field="prompt")
    if len(prompt) >= info.max_context:
        raise UserError(
            f"this model's maximum context length is {info.max_context} tokens, but {label} has {len(prompt)} tokens",
            field="prompt",
        )
