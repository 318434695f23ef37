"""The OpenAI-compatible routes: `/completions`, `/chat/completions` and `/models`, mounted at
`/oai/api/v1` (the path Tinker documents) and at `/v1`.

The model name is a base model or a checkpoint path — `tinker://<run>/sampler_weights/<name>`,
or a training checkpoint `tinker://<run>/weights/<name>` — whose LoRA adapter is applied on
the same engine, with the same token sampler, as the Tinker `SamplingClient`: both doors
take `core/sampling.py`'s path, so a greedy completion here and a greedy
`SamplingClient.sample` give the same tokens.

This file translates: `openai_protocol.py` parses the request, the core checks and
submits one sample request per prompt, `openai_render.py` turns tokens back into OpenAI's
shapes. Completions and chat differ only in how a choice is rendered (`ChoiceShape`);
the streaming and non-streaming scaffold (`respond`) is theirs in common.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinkerd.api.openai_protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_CHARS_PER_TOKEN,
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    from_user_error,
    invalid,
    parse_prompt,
    parse_request,
    render_chat,
    request_body_schema,
    sampling_params,
)
from tinkerd.api.openai_render import (
    ChoiceText,
    Detokenizer,
    TokenNames,
    TokenOut,
    chat_logprobs,
    completion_logprobs,
    merge_logprobs,
    prompt_logprobs,
    sse,
    top_alternatives,
)
from tinkerd.core import sampling
from tinkerd.core.access import SYSTEM, User
from tinkerd.core.sampling import SampleTarget
from tinkerd.core.service import Service
from tinkerd.core.tokenizers import tokenizer_of
from tinkerd.types import NotFound, SampleRequest, SampleResult, TokenEvent, UserError

PREFIXES = ("/oai/api/v1", "/v1")


def resolve_model(service: Service, model: str, user: User) -> SampleTarget:
    """The core's resolution, with OpenAI's answer for every name it cannot serve (or `user`
    may not read): 404."""
    try:
        return service.sampling.resolve(model, user)
    except UserError as exc:
        hint = "" if model.startswith("tinker://") else (
            f". Use a base model ({', '.join(service.engines)}) or a checkpoint path tinker://<run>/sampler_weights/<name>")
        raise OpenAIError(404, f"The model `{model}` does not exist: {exc}{hint}", param="model", code="model_not_found") from None


# -- running the samples of one request ------------------------------------------------------


class Run:
    """The choices of one request: prompt p, sample i is choice p * n + i."""

    def __init__(self, service: Service, user: User, target: SampleTarget, requests: list[SampleRequest], stops: list[str]):
        self.service = service
        self.user = user  # whose queued work the requests count as (core/work_cap.py)
        self.target = target
        self.requests = requests
        self.n = requests[0].num_samples
        tokenizer = tokenizer_of(target.info)
        eos = frozenset(target.info.eos_token_ids)
        run_id = uuid.uuid4().hex
        for p, request in enumerate(requests):
            request.request_id = f"oai-{run_id}-{p}"
        self.choices = [
            ChoiceText(Detokenizer(tokenizer, request.prompt, skip_special_tokens=True), stops, eos)
            for request in requests
            for _ in range(self.n)
        ]
        self.results: list[SampleResult | None] = [None] * len(requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def completion_tokens(self) -> int:
        return sum(c.pushed for c in self.choices)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            # Prompt tokens the engine took from its prefix cache instead of computing them.
            "prompt_tokens_details": {"cached_tokens": sum(r.prompt_cache_hit_tokens for r in self.results if r is not None)},
        }

    def submit(self, p: int, on_token: Callable[[TokenEvent], None] | None = None) -> Future:
        future = self.service.sampling.submit(self.target, self.requests[p], on_token)
        self.service.work.hold(self.user, future)
        return future

    def cancel(self, p: int | None = None, sample_index: int | None = None) -> None:
        """Stop prompt p's sample (all of them: sample_index None), or every prompt's (p None)."""
        for q in range(len(self.requests)) if p is None else [p]:
            self.service.sampling.cancel(self.target, self.requests[q].request_id, sample_index)

    def push(self, c: int, token: int, logprob: float, top: Any) -> None:
        """A streamed token of choice c; a choice that hit a stop string stops in the engine too."""
        choice = self.choices[c]
        choice.push(token, logprob, list(top) if top is not None else None)
        if choice.done:
            self.cancel(c // self.n, c % self.n)

    def complete(self, p: int, result: SampleResult) -> None:
        """Feed the tokens of prompt p's samples not seen through streaming, then finish them."""
        self.results[p] = result
        for i, seq in enumerate(result.sequences):
            choice = self.choices[p * self.n + i]
            for j in range(choice.pushed, len(seq.tokens)):
                choice.push(seq.tokens[j], seq.logprobs[j], top_alternatives(seq, j))
            choice.finish(seq.stop_reason)

    async def run_to_end(self, receive: Callable[[], Awaitable[dict]] | None = None) -> None:
        """Sample everything; a client that hangs up meanwhile stops its rows in the engine.

        `receive` is the request's ASGI receive, called after the body was read: it returns
        http.disconnect when the client goes. (Request.is_disconnected() cannot see that
        behind the app's BaseHTTPMiddleware, which swallows the message.)
        """
        futures = [asyncio.wrap_future(self.submit(p)) for p in range(len(self.requests))]
        gathered = asyncio.ensure_future(_gather_engine(futures))
        watch = asyncio.ensure_future(receive()) if receive is not None else None
        try:
            await asyncio.wait([gathered, watch] if watch is not None else [gathered], return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch.done() and not watch.cancelled() and watch.exception() is None:
                if watch.result().get("type") == "http.disconnect":
                    self.cancel()
            await gathered
        finally:
            if watch is not None:
                watch.cancel()
        for p, result in enumerate(gathered.result()):
            self.complete(p, result)

    def start_streaming(self, queue: asyncio.Queue) -> None:
        """Submit every prompt; tokens and completions arrive on `queue` from the engine thread."""
        loop = asyncio.get_running_loop()
        n = self.n

        def send(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closing: nobody is listening any more
                pass

        for p in range(len(self.requests)):
            def on_token(event: TokenEvent, p: int = p) -> None:
                send(("token", p * n + event.sample_index, event.token, event.logprob, event.top))

            future = self.submit(p, on_token)
            future.add_done_callback(lambda f, p=p: send(("done", p, f)))


async def _gather_engine(futures: list[asyncio.Future]) -> list[SampleResult]:
    try:
        return list(await asyncio.gather(*futures))
    except UserError as exc:
        raise OpenAIError(400, str(exc)) from None
    except OpenAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - the engine logged it; the client gets a 500
        raise OpenAIError(500, f"sampling failed: {type(exc).__name__}: {exc}") from None


def engine_outcome(future: Future) -> SampleResult:
    exc = future.exception()
    if exc is None:
        return future.result()
    if isinstance(exc, UserError):
        raise OpenAIError(400, str(exc))
    raise OpenAIError(500, f"sampling failed: {type(exc).__name__}: {exc}")


# -- the scaffold both endpoints share -------------------------------------------------------


class ChoiceShape:
    """How an endpoint renders a choice; /completions and /chat/completions differ only here."""

    object = ""
    chunk_object = ""

    def full(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict:
        raise NotImplementedError

    def delta(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict | None:
        raise NotImplementedError

    def opening(self, choices: int) -> list[dict]:
        return []


async def respond(run: Run, shape: ChoiceShape, head: dict, stream: bool, include_usage: bool,
                  receive: Callable[[], Awaitable[dict]]) -> Response:
    if not stream:
        await run.run_to_end(receive)
        choices = [shape.full(c, *choice.take()) for c, choice in enumerate(run.choices)]
        return JSONResponse({**head, "object": shape.object, "choices": choices, "usage": run.usage()})

    def chunk(body: dict) -> dict:
        return {**head, "object": shape.chunk_object, **body, **({"usage": body.get("usage")} if include_usage else {})}

    events = stream_events(run, chunk, shape.delta, shape.opening(len(run.choices)), include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


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
        waiting = len(run.requests)
        while waiting:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            touched: set[int] = set()
            for event in events:
                if event[0] == "token":
                    _, c, token, logprob, top = event
                    run.push(c, token, logprob, top)
                    touched.add(c)
                else:
                    _, p, future = event
                    run.complete(p, engine_outcome(future))
                    waiting -= 1
                    touched.update(range(p * run.n, (p + 1) * run.n))
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
        run.cancel()  # stops the engine rows of a client that disconnected mid-stream


class CompletionShape(ChoiceShape):
    object = chunk_object = "text_completion"

    def __init__(self, run: Run, names: TokenNames, logprobs: int | None, echo_texts: list[str] | None):
        self.run = run
        self.names = names
        self.logprobs = logprobs
        self.echo_texts = echo_texts  # None: no echo

    def _prefix(self, c: int) -> str:
        return self.echo_texts[c // self.run.n] if self.echo_texts is not None else ""

    def full(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict:
        prefix = self._prefix(c)
        logprobs = None
        if self.logprobs is not None:
            logprobs = completion_logprobs(tokens, self.names, offset=len(prefix))
            if self.echo_texts is not None:
                p = c // self.run.n
                tokenizer = tokenizer_of(self.run.target.info)
                echoed = prompt_logprobs(self.run.results[p], self.run.requests[p].prompt, tokenizer, self.names)
                logprobs = merge_logprobs(echoed, logprobs)
        return {"index": c, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict | None:
        if not text and not tokens and finish is None:
            return None
        logprobs = completion_logprobs(tokens, self.names, len(self._prefix(c))) if self.logprobs is not None else None
        return {"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, choices: int) -> list[dict]:
        if self.echo_texts is None:
            return []
        return [{"index": c, "text": self._prefix(c), "logprobs": None, "finish_reason": None} for c in range(choices)]


class ChatShape(ChoiceShape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, names: TokenNames, logprobs: int | None):
        self.names = names
        self.logprobs = logprobs

    def _logprobs(self, tokens: list[TokenOut]) -> dict | None:
        return {"content": chat_logprobs(tokens, self.names), "refusal": None} if self.logprobs is not None else None

    def full(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict:
        return {"index": c, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self._logprobs(tokens), "finish_reason": finish}

    def delta(self, c: int, text: str, tokens: list[TokenOut], finish: str | None) -> dict | None:
        if not text and not tokens and finish is None:
            return None
        return {"index": c, "delta": {"content": text} if text or finish is None else {},
                "logprobs": self._logprobs(tokens), "finish_reason": finish}

    def opening(self, choices: int) -> list[dict]:
        return [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for c in range(choices)]


# -- the routes ------------------------------------------------------------------------------


class OpenAIFrontDoor:
    def __init__(self, service: Service):
        self.service = service
        self.started = int(time.time())

    def _checked(self, target: SampleTarget, request: SampleRequest, names: dict[str, str], **policy: Any) -> SampleRequest:
        try:
            return sampling.check(target.info, request, refuse_overflow=True, **policy)
        except UserError as exc:
            raise from_user_error(exc, names) from None

    # /completions

    async def completions(self, request: Request) -> Response:
        try:
            return await self._completions(request)
        except OpenAIError as exc:
            return exc.response()

    async def _completions(self, request: Request) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        target = resolve_model(self.service, req.model, request.state.user)
        info = target.info
        tokenizer = tokenizer_of(info)
        prompts, prompt_texts = parse_prompt(req.prompt, tokenizer, max_chars=MAX_CHARS_PER_TOKEN * info.max_context)
        params, n = sampling_params(req, req.max_tokens)
        if len(prompts) * n > MAX_CHOICES:
            raise invalid("n", f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request")
        if req.logprobs is not None and not (0 <= req.logprobs <= MAX_TOP_LOGPROBS):
            raise invalid("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs}")
        echo = bool(req.echo)
        stream = bool(req.stream)
        if stream and echo and req.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs is not supported when streaming; drop stream, echo or logprobs", param="echo")
        if req.stream_options is not None and not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        echo_logprobs = echo and req.logprobs is not None
        k = req.logprobs or 0
        names = {"num_samples": "n", "topk_sample_logprobs": "logprobs", "topk_prompt_logprobs": "logprobs"}
        requests = [
            self._checked(target, SampleRequest(
                prompt=prompt, num_samples=n, params=params, prompt_logprobs=echo_logprobs,
                topk_prompt_logprobs=k if echo_logprobs else 0, topk_sample_logprobs=k,
                tenant=getattr(request.state, "tenant", ""),
            ), names, prompt_label="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
            for i, prompt in enumerate(prompts)
        ]
        # Each prompt's request is bounded by the shared check; the prompts of one call together too.
        sampled = sum(r.num_samples * r.params.max_tokens for r in requests)
        if sampled > sampling.MAX_SAMPLED_TOKENS:
            raise invalid("max_tokens", f"{len(prompts)} prompts x n={n} x their max_tokens is {sampled} tokens, more than "
                                        f"{sampling.MAX_SAMPLED_TOKENS} sampled tokens in one request")
        self.service.work.admit(request.state.user)
        run = Run(self.service, request.state.user, target, requests, params.stop_strings)
        echo_texts = None
        if echo:
            echo_texts = [t if t is not None else tokenizer.decode(p, skip_special_tokens=False)
                          for p, t in zip(prompts, prompt_texts, strict=True)]
        shape = CompletionShape(run, TokenNames(tokenizer, bool(req.return_tokens_as_token_ids)), req.logprobs, echo_texts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model, "system_fingerprint": None}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(run, shape, head, stream, include_usage, request.receive)

    # /chat/completions

    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat_completions(request)
        except OpenAIError as exc:
            return exc.response()

    async def _chat_completions(self, request: Request) -> Response:
        req: ChatRequest = parse_request(ChatRequest, await request.body())
        target = resolve_model(self.service, req.model, request.state.user)
        info = target.info
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params, n = sampling_params(req, max_tokens)
        if req.top_logprobs is not None:
            if not (0 <= req.top_logprobs <= MAX_TOP_LOGPROBS):
                raise invalid("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
            if not req.logprobs:
                raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        stream = bool(req.stream)
        if req.stream_options is not None and not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        tokenizer = tokenizer_of(info)
        prompt = render_chat(req.messages, tokenizer, max_chars=MAX_CHARS_PER_TOKEN * info.max_context)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        names = {"num_samples": "n", "prompt": "messages", "max_tokens": tokens_param, "topk_sample_logprobs": "top_logprobs"}
        checked = self._checked(target, SampleRequest(prompt=prompt, num_samples=n, params=params,
                                                      topk_sample_logprobs=logprobs or 0,
                                                      tenant=getattr(request.state, "tenant", "")),
                                names, prompt_label="messages", min_max_tokens=1)
        self.service.work.admit(request.state.user)
        run = Run(self.service, request.state.user, target, [checked], params.stop_strings)
        shape = ChatShape(TokenNames(tokenizer, bool(req.return_tokens_as_token_ids)), logprobs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model, "system_fingerprint": None}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(run, shape, head, stream, include_usage, request.receive)

    # /models

    def _model_entries(self, user: User) -> list[dict]:
        """The base models, and the sampler checkpoints `user` may read: their own and the published ones."""
        entries = [
            {"id": name, "object": "model", "created": self.started, "owned_by": "tinkerd", "root": name, "parent": None,
             "max_model_len": engine.info.max_context}
            for name, engine in self.service.engines.items()
        ]
        base_of: dict[str, str | None] = {}
        now = time.time()
        for row in self.service.readable_checkpoints(user):
            if row.kind != "sampler_weights":
                continue
            if row.expires_at is not None and _timestamp(row.expires_at) <= now:
                continue
            if row.run_id not in base_of:
                try:
                    base_of[row.run_id] = self.service.registry.run_row(row.run_id, SYSTEM).base_model
                except NotFound:
                    base_of[row.run_id] = None
            base = base_of[row.run_id]
            if base is None or base not in self.service.engines:
                continue
            entries.append({
                "id": f"tinker://{row.run_id}/{row.kind}/{row.name}", "object": "model", "created": int(_timestamp(row.created_at)),
                "owned_by": "tinkerd", "root": base, "parent": base,
                "max_model_len": self.service.engines[base].info.max_context,
            })
        return entries

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_entries(request.state.user)})

    async def retrieve_model(self, model: str, request: Request) -> Response:
        try:
            for entry in self._model_entries(request.state.user):
                if entry["id"] == model:
                    return JSONResponse(entry)
            target = resolve_model(self.service, model, request.state.user)  # a training checkpoint, or a 404
            return JSONResponse({"id": model, "object": "model", "created": self.started, "owned_by": "tinkerd",
                                 "root": target.base_model, "parent": target.base_model, "max_model_len": target.info.max_context})
        except OpenAIError as exc:
            return exc.response()


def _timestamp(value: Any) -> float:
    import datetime as dt

    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def build_openai_routers(service: Service) -> list[APIRouter]:
    door = OpenAIFrontDoor(service)
    routers = []
    for prefix in PREFIXES:
        router = APIRouter(prefix=prefix, tags=["openai"])
        # The routes read their bodies themselves; their schemas are published for clients and fuzzers.
        router.add_api_route("/completions", door.completions, methods=["POST"],
                             openapi_extra={"requestBody": request_body_schema(CompletionRequest)})
        router.add_api_route("/chat/completions", door.chat_completions, methods=["POST"],
                             openapi_extra={"requestBody": request_body_schema(ChatRequest)})
        router.add_api_route("/models", door.list_models, methods=["GET"])
        router.add_api_route("/models/{model:path}", door.retrieve_model, methods=["GET"])
        routers.append(router)
    return routers
