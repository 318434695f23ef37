"""The OpenAI-compatible routes: `/completions`, `/chat/completions` and `/models`, mounted at
`/oai/api/v1` (the path Tinker documents) and at `/v1`.

The model name is a base model or a checkpoint path — `tinker://<run>/sampler_weights/<name>`,
or a training checkpoint `tinker://<run>/weights/<name>` — whose LoRA adapter is applied on
the same engine, with the same token sampler, as the Tinker `SamplingClient`: a greedy
completion here and a greedy `SamplingClient.sample` give the same tokens.

This file only translates. It validates the OpenAI request, builds one engine
`SampleRequest` per prompt, and turns the sampled tokens back into OpenAI's shapes: text
(cut before the first stop string, as OpenAI does — the engine stops *at* a stop string but
does not trim), logprobs, finish_reason, usage, and server-sent events for `stream`.

Every request field either does what OpenAI documents, or cannot change the output (`user`,
`metadata`, ...), or is rejected with a 400 that names it. Nothing is silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from tinkerd.core.service import BadRequest, NotFound, Service
from tinkerd.engine.types import AdapterRef, SampleRequest, SampleResult, SamplingParams, UserInputError

if TYPE_CHECKING:
    from tinkerd.engine.engine import Engine

PREFIXES = ("/oai/api/v1", "/v1")
MAX_N = 128  # samples per prompt, as for the Tinker sampler
MAX_CHOICES = 1024  # prompts x n in one request
MAX_TOP_LOGPROBS = 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /completions; chat defaults to the rest of the context
MAX_CHARS_PER_TOKEN = 64  # text longer than this many characters per context token cannot fit: refused before tokenizing


# -- errors ----------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or {401: "authentication_error", 404: "not_found_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}" if not message.startswith(param) else message, param=param)


# -- request schemas -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding fields against side channels; we send none


class _CommonRequest(BaseModel):
    # strict: "3" is not a number and true is not 1; extra fields are checked by hand below.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM spellings, sent with the SDK's extra_body=):
    top_k: int | None = None
    return_tokens_as_token_ids: bool | None = None


class CompletionRequest(_CommonRequest):
    prompt: Any
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_CommonRequest):
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools, which are rejected
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    # Bookkeeping fields that cannot change the output:
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


# Fields this server does not implement, and the values at which they are a no-op.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v is None or v == 0,
    "presence_penalty": lambda v: v is None or v == 0,
    "logit_bias": lambda v: not v,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
}


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "missing":
            raise OpenAIError(400, f"{param}: this field is required", param=param) from None
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise OpenAIError(400, f"{param}: invalid value {shown} ({err['msg'].lower()})", param=param) from None
    for name in req.model_extra or {}:
        raise OpenAIError(400, f"unrecognized request argument supplied: {name}", param=name)
    for name, neutral in _NEUTRAL.items():
        if name in model.model_fields and not neutral(getattr(req, name)):
            raise OpenAIError(400, f"{name} is not supported by this server", param=name)
    if isinstance(req, CompletionRequest) and req.best_of not in (None, req.n or 1):
        raise OpenAIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of")
    return req


# -- sampling parameters ---------------------------------------------------------------------


@dataclass
class Plan:
    """What to sample, in engine terms, for one OpenAI request."""

    engine: Engine
    adapter: AdapterRef | None
    prompts: list[list[int]]
    n: int
    max_tokens: int | None  # None: up to the end of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: list[str]
    logprobs: int | None  # top-k alternatives per token; None: no logprobs at all
    echo_logprobs: bool = False  # also score the prompt (completions with echo + logprobs)

    def sample_request(self, index: int, **callbacks: Any) -> SampleRequest:
        prompt = self.prompts[index]
        max_tokens = self.max_tokens if self.max_tokens is not None else self.engine.max_context - len(prompt)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            seed=self.seed, stop_strings=list(self.stops),
        )
        k = self.logprobs or 0
        return SampleRequest(
            prompt=prompt, num_samples=self.n, params=params, adapter=self.adapter,
            prompt_logprobs=self.echo_logprobs, topk_prompt_logprobs=k if self.echo_logprobs else 0,
            topk_sample_logprobs=k, **callbacks,
        )


def sampling_knobs(req: _CommonRequest) -> dict[str, Any]:
    temperature = 1.0 if req.temperature is None else req.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid("temperature", f"must be a number >= 0, got {temperature}")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not (0.0 < top_p <= 1.0):
        raise invalid("top_p", f"must be in (0, 1], got {top_p}")
    top_k = -1 if req.top_k in (None, 0) else req.top_k
    if top_k < -1:
        raise invalid("top_k", f"must be -1 (off) or >= 1, got {top_k}")
    n = 1 if req.n is None else req.n
    if not (1 <= n <= MAX_N):
        raise invalid("n", f"must be between 1 and {MAX_N}, got {n}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise invalid("stop", "stop sequences must be non-empty strings")
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "n": n, "seed": req.seed, "stops": stops}


def check_lengths(engine: Engine, prompts: list[list[int]], max_tokens: int | None, prompt_param: str, tokens_param: str) -> None:
    context = engine.max_context
    for i, prompt in enumerate(prompts):
        where = prompt_param if len(prompts) == 1 else f"{prompt_param}[{i}]"
        if not prompt:
            raise invalid(prompt_param, f"{where} is empty")
        bad = next((t for t in prompt if not (0 <= t < engine.vocab_size)), None)
        if bad is not None:
            raise invalid(prompt_param, f"{where} contains token id {bad}, outside the vocabulary [0, {engine.vocab_size})")
        if len(prompt) >= context:
            raise invalid(
                prompt_param,
                f"this model's maximum context length is {context} tokens, but {where} has {len(prompt)} tokens",
            )
        if max_tokens is not None and len(prompt) + max_tokens > context:
            raise invalid(
                tokens_param,
                f"this model's maximum context length is {context} tokens, but you requested {len(prompt) + max_tokens} "
                f"tokens ({len(prompt)} in the prompt, {max_tokens} for the completion)",
            )


# -- model names -----------------------------------------------------------------------------


def resolve_model(service: Service, model: str) -> tuple[Engine, AdapterRef | None]:
    """A base model name, or a checkpoint path whose adapter is loaded on first use (cached)."""
    engine = service.engines.get(model)
    if engine is not None:
        return engine, None
    if model.startswith("tinker://"):
        try:
            base_model, adapter = service.adapter_for_path(model)
        except (NotFound, BadRequest) as exc:
            raise OpenAIError(404, f"The model `{model}` does not exist: {exc}", param="model", code="model_not_found") from None
        engine = service.engines.get(base_model)
        if engine is None:
            raise OpenAIError(404, f"The model `{model}` needs base model {base_model!r}, which this server does not serve",
                              param="model", code="model_not_found")
        return engine, adapter
    raise OpenAIError(
        404,
        f"The model `{model}` does not exist. Use a base model ({', '.join(service.engines)}) or a checkpoint path "
        "tinker://<run>/sampler_weights/<name>",
        param="model", code="model_not_found",
    )


# -- tokens to text --------------------------------------------------------------------------


class Detokenizer:
    """Text of a growing token sequence, by whole characters.

    Decodes a short window (a few tokens of context plus the new ones) and holds back the
    bytes of an incomplete UTF-8 character (decoded as U+FFFD) until the token that
    completes it arrives. The context tokens let tokenizers that drop a leading space at
    the start of a decode (SentencePiece) get the first generated word right.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Any, context: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids = list(context[-self.CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens whose text was already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def partial_stop_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class TokenOut:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None  # the top-k alternatives, when asked for
    start: int  # character span of its text in the choice's text
    end: int


@dataclass
class ChoiceText:
    """One choice's output: text cut before the first stop string, and the tokens behind it.

    Streaming and non-streaming responses are both built from this, so they agree. Text is
    released as soon as it can no longer turn out to be the start of a stop string.
    """

    detok: Detokenizer
    stops: list[str]
    eos_ids: frozenset[int]
    text: str = ""
    tokens: list[TokenOut] = field(default_factory=list)
    pushed: int = 0  # engine tokens seen (usage counts all of them, EOS included)
    hit_stop: bool = False
    finish_reason: str | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_sent: bool = False

    @property
    def done(self) -> bool:
        return self.hit_stop or self.finish_reason is not None

    def push(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None) -> None:
        self.pushed += 1
        if self.done or token in self.eos_ids:  # EOS ends the sample; it is not part of the text
            return
        start = len(self.text)
        self.text += self.detok.push(token)
        self.tokens.append(TokenOut(token, logprob, top, start, len(self.text)))
        self._cut_at_stop(start)

    def _cut_at_stop(self, new_from: int) -> None:
        if not self.stops or self.hit_stop:
            return
        longest = max(len(s) for s in self.stops)
        search_from = max(0, new_from - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        self.tokens = [t for t in self.tokens if t.start < cut]
        for t in self.tokens:
            t.end = min(t.end, cut)
        self.hit_stop = True

    def finish(self, engine_reason: str) -> None:
        if not self.hit_stop:
            start = len(self.text)
            tail = self.detok.flush()
            if tail:
                self.text += tail
                if self.tokens:
                    self.tokens[-1].end = len(self.text)
                self._cut_at_stop(start)
        self.finish_reason = "stop" if self.hit_stop or engine_reason == "stop" else "length"

    def take(self) -> tuple[str, list[TokenOut], str | None]:
        """What is new since the last take: text, its tokens, and the finish reason once."""
        final = self.done
        limit = len(self.text) if final else len(self.text) - partial_stop_overlap(self.text, self.stops)
        limit = max(limit, self.sent_chars)
        text = self.text[self.sent_chars : limit]
        self.sent_chars = limit
        end = self.sent_tokens
        while end < len(self.tokens) and (final or self.tokens[end].end <= limit):
            end += 1
        tokens = self.tokens[self.sent_tokens : end]
        self.sent_tokens = end
        finish = None
        if self.finish_reason is not None and not self.finish_sent:
            finish, self.finish_sent = self.finish_reason, True
        return text, tokens, finish


# -- logprobs in OpenAI's two shapes ---------------------------------------------------------


def _finite(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    return max(x, -9999.0)


class TokenNames:
    def __init__(self, tokenizer: Any, as_ids: bool):
        self._tokenizer = tokenizer
        self._as_ids = as_ids

    def __call__(self, token: int) -> str:
        if self._as_ids:
            return f"token_id:{token}"
        return self._tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokens: list[TokenOut], names: TokenNames, offset: int = 0) -> dict:
    """The legacy shape: parallel lists; top_logprobs always include the sampled token."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        name = names(t.token)
        out["tokens"].append(name)
        out["token_logprobs"].append(_finite(t.logprob))
        out["text_offset"].append(offset + t.start)
        if t.top is None and t.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top = {names(tok): _finite(lp) for tok, lp in (t.top or [])}
        top.setdefault(name, _finite(t.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: list[TokenOut], names: TokenNames) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        name = names(token)
        return {"token": name, "logprob": _finite(logprob), "bytes": list(name.encode("utf-8"))}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in (t.top or [])]} for t in tokens]


def _top(result_seq: Any, j: int) -> list[tuple[int, float]] | None:
    if result_seq.topk_ids is None:
        return None
    return list(zip(result_seq.topk_ids[j], result_seq.topk_logprobs[j], strict=True))


# -- running a plan --------------------------------------------------------------------------


class Run:
    """The choices of one request: prompt p, sample i is choice p * n + i."""

    def __init__(self, plan: Plan):
        self.plan = plan
        tokenizer = plan.engine.tokenizer
        eos = frozenset(getattr(plan.engine.cfg, "eos_token_ids", ()) or ())
        self.choices = [
            ChoiceText(Detokenizer(tokenizer, prompt, skip_special_tokens=True), plan.stops, eos)
            for prompt in plan.prompts
            for _ in range(plan.n)
        ]
        self.results: list[SampleResult | None] = [None] * len(plan.prompts)
        self.client_gone = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.plan.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.pushed for c in self.choices)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def complete(self, p: int, result: SampleResult) -> None:
        """Feed the tokens of prompt p's samples not seen through streaming, then finish them."""
        self.results[p] = result
        for i, seq in enumerate(result.sequences):
            choice = self.choices[p * self.plan.n + i]
            for j in range(choice.pushed, len(seq.tokens)):
                choice.push(seq.tokens[j], seq.logprobs[j], _top(seq, j))
            choice.finish(seq.stop_reason)

    async def run_to_end(self, receive: Callable[[], Awaitable[dict]] | None = None) -> None:
        """Sample everything; a client that hangs up meanwhile stops its rows in the engine.

        `receive` is the request's ASGI receive, called after the body was read: it returns
        http.disconnect when the client goes. (Request.is_disconnected() cannot see that
        behind the app's BaseHTTPMiddleware, which swallows the message.)
        """

        def is_cancelled(_: int) -> bool:
            return self.client_gone

        futures = [
            asyncio.wrap_future(self.plan.engine.sample(self.plan.sample_request(p, is_cancelled=is_cancelled)))
            for p in range(len(self.plan.prompts))
        ]
        gathered = asyncio.ensure_future(_gather_engine(futures))
        watch = asyncio.ensure_future(receive()) if receive is not None else None
        try:
            await asyncio.wait([gathered, watch] if watch is not None else [gathered], return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch.done() and not watch.cancelled() and watch.exception() is None:
                self.client_gone = watch.result().get("type") == "http.disconnect"
            await gathered
        finally:
            if watch is not None:
                watch.cancel()
        for p, result in enumerate(gathered.result()):
            self.complete(p, result)

    def start_streaming(self, queue: asyncio.Queue) -> None:
        """Submit every prompt; tokens and completions arrive on `queue` from the engine thread."""
        loop = asyncio.get_running_loop()
        n = self.plan.n

        def send(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closing: nobody is listening any more
                pass

        for p in range(len(self.plan.prompts)):
            latest_top: dict[int, list[tuple[int, float]]] = {}

            def on_token_topk(i: int, ids: list[int], lps: list[float], latest_top: dict = latest_top) -> None:
                latest_top[i] = list(zip(ids, lps, strict=True))

            def on_token(i: int, token: int, logprob: float, p: int = p, latest_top: dict = latest_top) -> None:
                send(("token", p * n + i, token, logprob, latest_top.pop(i, None)))

            def is_cancelled(i: int, p: int = p) -> bool:
                return self.client_gone or self.choices[p * n + i].done

            request = self.plan.sample_request(
                p, on_token=on_token, on_token_topk=on_token_topk if self.plan.logprobs else None, is_cancelled=is_cancelled
            )
            future = self.plan.engine.sample(request)
            future.add_done_callback(lambda f, p=p: send(("done", p, f)))


async def _gather_engine(futures: list[asyncio.Future]) -> list[SampleResult]:
    try:
        return list(await asyncio.gather(*futures))
    except UserInputError as exc:
        raise OpenAIError(400, str(exc)) from None
    except OpenAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - the engine logged it; the client gets a 500
        raise OpenAIError(500, f"sampling failed: {type(exc).__name__}: {exc}") from None


def engine_outcome(future: Any) -> SampleResult:
    exc = future.exception()
    if exc is None:
        return future.result()
    if isinstance(exc, UserInputError):
        raise OpenAIError(400, str(exc))
    raise OpenAIError(500, f"sampling failed: {type(exc).__name__}: {exc}")


# -- server-sent events ----------------------------------------------------------------------


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, allow_nan=False)}\n\n"


async def stream_events(
    run: Run,
    chunk: Callable[[dict], dict],
    choice_delta: Callable[[int, str, list[TokenOut], str | None], dict | None],
    opening: list[dict],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Chunks as tokens arrive; `choice_delta` renders one choice's news (None: nothing to say)."""
    queue: asyncio.Queue = asyncio.Queue()
    try:
        run.start_streaming(queue)
        for choices in opening:
            yield sse(chunk({"choices": [choices]}))
        waiting = len(run.plan.prompts)
        while waiting:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            touched: set[int] = set()
            for event in events:
                if event[0] == "token":
                    _, c, token, logprob, top = event
                    run.choices[c].push(token, logprob, top)
                    touched.add(c)
                else:
                    _, p, future = event
                    run.complete(p, engine_outcome(future))
                    waiting -= 1
                    touched.update(range(p * run.plan.n, (p + 1) * run.plan.n))
            for c in sorted(touched):
                rendered = choice_delta(c, *run.choices[c].take())
                if rendered is not None:
                    yield sse(chunk({"choices": [rendered]}))
        if include_usage:
            yield sse(chunk({"choices": [], "usage": run.usage()}))
        yield sse("[DONE]")
    except OpenAIError as exc:
        yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        run.client_gone = True  # stops the engine rows of a client that disconnected mid-stream


# -- the routes ------------------------------------------------------------------------------


class OpenAIFrontDoor:
    def __init__(self, service: Service):
        self.service = service
        self.started = int(time.time())

    # /completions

    async def completions(self, request: Request) -> Response:
        try:
            return await self._completions(request)
        except OpenAIError as exc:
            return exc.response()

    async def _completions(self, request: Request) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        engine, adapter = resolve_model(self.service, req.model)
        knobs = sampling_knobs(req)
        tokenizer = engine.tokenizer
        prompts, prompt_texts = parse_prompt(req.prompt, tokenizer, max_chars=MAX_CHARS_PER_TOKEN * engine.max_context)
        if len(prompts) * knobs["n"] > MAX_CHOICES:
            raise invalid("n", f"{len(prompts)} prompts x n={knobs['n']} is more than {MAX_CHOICES} choices in one request")
        if req.max_tokens is not None and req.max_tokens < 0:
            raise invalid("max_tokens", f"must be >= 0, got {req.max_tokens}")
        check_lengths(engine, prompts, req.max_tokens, "prompt", "max_tokens")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, engine.max_context - max(len(p) for p in prompts))
        if req.logprobs is not None and not (0 <= req.logprobs <= MAX_TOP_LOGPROBS):
            raise invalid("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs}")
        echo = bool(req.echo)
        stream = bool(req.stream)
        if stream and echo and req.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs is not supported when streaming; drop stream, echo or logprobs", param="echo")
        if req.stream_options is not None and not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        plan = Plan(engine, adapter, prompts, max_tokens=max_tokens, logprobs=req.logprobs,
                    echo_logprobs=echo and req.logprobs is not None, **knobs)
        echo_texts = [t if t is not None else tokenizer.decode(p, skip_special_tokens=False) for p, t in zip(prompts, prompt_texts, strict=True)]
        run = Run(plan)
        names = TokenNames(tokenizer, bool(req.return_tokens_as_token_ids))
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": response_id, "object": "text_completion", "created": created, "model": req.model, "system_fingerprint": None}
        n = plan.n

        if not stream:
            await run.run_to_end(request.receive)
            choices = []
            for c, choice in enumerate(run.choices):
                text, tokens, finish = choice.take()
                p = c // n
                prefix = echo_texts[p] if echo else ""
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(tokens, names, offset=len(prefix))
                    if echo:
                        logprobs = merge_logprobs(prompt_logprobs(run.results[p], prompts[p], tokenizer, names), logprobs)
                choices.append({"index": c, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish})
            return JSONResponse({**head, "choices": choices, "usage": run.usage()})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets = [len(echo_texts[c // n]) if echo else 0 for c in range(len(run.choices))]

        def chunk(body: dict) -> dict:
            return {**head, **body, **({"usage": body.get("usage")} if include_usage else {})}

        def choice_delta(c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict | None:
            if not text and not tokens and finish is None:
                return None
            logprobs = completion_logprobs(tokens, names, offsets[c]) if req.logprobs is not None else None
            return {"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish}

        opening = (
            [{"index": c, "text": echo_texts[c // n], "logprobs": None, "finish_reason": None} for c in range(len(run.choices))]
            if echo else []
        )
        return StreamingResponse(stream_events(run, chunk, choice_delta, opening, include_usage), media_type="text/event-stream")

    # /chat/completions

    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat_completions(request)
        except OpenAIError as exc:
            return exc.response()

    async def _chat_completions(self, request: Request) -> Response:
        req: ChatRequest = parse_request(ChatRequest, await request.body())
        engine, adapter = resolve_model(self.service, req.model)
        knobs = sampling_knobs(req)
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise invalid(tokens_param, f"must be >= 1, got {max_tokens}")
        if req.top_logprobs is not None:
            if not (0 <= req.top_logprobs <= MAX_TOP_LOGPROBS):
                raise invalid("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
            if not req.logprobs:
                raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        stream = bool(req.stream)
        if req.stream_options is not None and not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        tokenizer = engine.tokenizer
        prompt = render_chat(req.messages, tokenizer, max_chars=MAX_CHARS_PER_TOKEN * engine.max_context)
        check_lengths(engine, [prompt], max_tokens, "messages", tokens_param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        plan = Plan(engine, adapter, [prompt], max_tokens=max_tokens, logprobs=logprobs, **knobs)
        run = Run(plan)
        names = TokenNames(tokenizer, bool(req.return_tokens_as_token_ids))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model, "system_fingerprint": None}

        if not stream:
            await run.run_to_end(request.receive)
            choices = []
            for c, choice in enumerate(run.choices):
                text, tokens, finish = choice.take()
                choices.append({
                    "index": c,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": {"content": chat_logprobs(tokens, names), "refusal": None} if logprobs is not None else None,
                    "finish_reason": finish,
                })
            return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": run.usage()})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(body: dict) -> dict:
            return {**head, "object": "chat.completion.chunk", **body, **({"usage": body.get("usage")} if include_usage else {})}

        def choice_delta(c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict | None:
            if not text and not tokens and finish is None:
                return None
            return {
                "index": c,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": {"content": chat_logprobs(tokens, names), "refusal": None} if logprobs is not None else None,
                "finish_reason": finish,
            }

        opening = [
            {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for c in range(len(run.choices))
        ]
        return StreamingResponse(stream_events(run, chunk, choice_delta, opening, include_usage), media_type="text/event-stream")

    # /models

    def _model_entries(self) -> list[dict]:
        entries = [
            {"id": name, "object": "model", "created": self.started, "owned_by": "tinkerd", "root": name, "parent": None,
             "max_model_len": engine.max_context}
            for name, engine in self.service.engines.items()
        ]
        base_of: dict[str, str | None] = {}
        now = time.time()
        for row in self.service.list_checkpoints():
            if row.kind != "sampler_weights":
                continue
            if row.expires_at is not None and _timestamp(row.expires_at) <= now:
                continue
            if row.run_id not in base_of:
                try:
                    base_of[row.run_id] = self.service.get_run(row.run_id).base_model
                except NotFound:
                    base_of[row.run_id] = None
            base = base_of[row.run_id]
            if base is None or base not in self.service.engines:
                continue
            entries.append({
                "id": f"tinker://{row.run_id}/{row.kind}/{row.name}", "object": "model", "created": int(_timestamp(row.created_at)),
                "owned_by": "tinkerd", "root": base, "parent": base,
                "max_model_len": self.service.engines[base].max_context,
            })
        return entries

    async def list_models(self) -> Response:
        return JSONResponse({"object": "list", "data": self._model_entries()})

    async def retrieve_model(self, model: str) -> Response:
        try:
            for entry in self._model_entries():
                if entry["id"] == model:
                    return JSONResponse(entry)
            engine, _ = resolve_model(self.service, model)  # a training checkpoint, or a 404
            return JSONResponse({"id": model, "object": "model", "created": self.started, "owned_by": "tinkerd",
                                 "root": engine.name, "parent": engine.name, "max_model_len": engine.max_context})
        except OpenAIError as exc:
            return exc.response()


def _timestamp(value: Any) -> float:
    import datetime as dt

    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


# -- prompts ---------------------------------------------------------------------------------


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_prompt(prompt: Any, tokenizer: Any, max_chars: int) -> tuple[list[list[int]], list[str | None]]:
    """Token lists (and the original text, for echo) of a string, strings, token ids, or lists of them."""
    shapes = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    if any(isinstance(t, str) and len(t) > max_chars for t in texts):
        raise invalid("prompt", f"is longer than the model's context ({max(len(t) for t in texts if isinstance(t, str))} characters)")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", f"must be {shapes}" + (" (got an empty list)" if prompt == [] else ""))
    if all(isinstance(x, str) for x in prompt):
        return [tokenizer.encode(x) for x in prompt], list(prompt)
    if all(_is_token(x) for x in prompt):
        return [list(prompt)], [None]
    if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in prompt):
        return [list(x) for x in prompt], [None] * len(prompt)
    raise invalid("prompt", f"must be {shapes}")


def prompt_logprobs(result: SampleResult | None, prompt: list[int], tokenizer: Any, names: TokenNames) -> dict:
    """Logprobs of the prompt's own tokens for echo (the first token has none)."""
    assert result is not None
    detok = Detokenizer(tokenizer, [], skip_special_tokens=False)
    tokens: list[TokenOut] = []
    offset = 0
    scores = result.prompt_logprobs or [float("nan")] * len(prompt)
    for j, token in enumerate(prompt):
        piece = detok.push(token) + (detok.flush() if j == len(prompt) - 1 else "")
        top = None
        if result.topk_prompt_ids is not None and j > 0:
            top = list(zip(result.topk_prompt_ids[j], result.topk_prompt_logprobs[j], strict=True))
        tokens.append(TokenOut(token, scores[j], top, offset, offset + len(piece)))
        offset += len(piece)
    out = completion_logprobs(tokens, names)
    out["token_logprobs"][0] = None
    out["top_logprobs"][0] = None
    return out


def merge_logprobs(first: dict, second: dict) -> dict:
    return {k: first[k] + second[k] for k in first}


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def render_chat(messages: list[Any], tokenizer: Any, max_chars: int) -> list[int]:
    """Prompt tokens of a conversation, rendered with the base model's chat template."""
    if not messages:
        raise invalid("messages", "must contain at least one message")
    conversation: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, "must be an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise OpenAIError(
                400, f"{where}.role: unknown or unsupported role {role!r}; use system, developer, user or assistant",
                param=f"{where}.role",
            )
        for key, value in message.items():
            if key in ("role", "content", "name"):
                continue
            if key in ("tool_calls", "function_call", "audio", "refusal") and not value:
                continue
            raise OpenAIError(400, f"{where}.{key} is not supported by this server", param=f"{where}.{key}")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise OpenAIError(400, f"{where}.content[{j}]: only text parts are supported, got {kind!r}",
                                      param=f"{where}.content[{j}]")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise OpenAIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        entry = {"role": _ROLES[role], "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        conversation.append(entry)
    if sum(len(m["content"]) for m in conversation) > max_chars:
        raise invalid("messages", "are longer than the model's context")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception, e.g. roles that must alternate
        raise OpenAIError(400, f"messages cannot be rendered with the model's chat template: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def build_openai_routers(service: Service) -> list[APIRouter]:
    door = OpenAIFrontDoor(service)
    routers = []
    for prefix in PREFIXES:
        router = APIRouter(prefix=prefix, tags=["openai"])
        router.add_api_route("/completions", door.completions, methods=["POST"])
        router.add_api_route("/chat/completions", door.chat_completions, methods=["POST"])
        router.add_api_route("/models", door.list_models, methods=["GET"])
        router.add_api_route("/models/{model:path}", door.retrieve_model, methods=["GET"])
        routers.append(router)
    return routers
