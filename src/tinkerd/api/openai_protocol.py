"""The OpenAI request side: schemas, what is refused, and prompts / chats into tokens.

Every request field either does what OpenAI documents, or cannot change the output
(`user`, `metadata`, ...), or is refused with a 400 that names it. Nothing is silently
ignored. The checks every sampling request needs (tokens, context, temperature, ...)
are not here: they are `core/sampling.py`'s, shared with the Tinker door.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, WithJsonSchema

from tinkerd.api.bodies import UNPAIRED_SURROGATE, has_unpaired_surrogate
from tinkerd.types import SamplingParams, UserError

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


def from_user_error(exc: UserError, names: dict[str, str] | None = None) -> OpenAIError:
    """A check failure of the core in OpenAI's shape: `param` is the field in this door's
    words (`names` maps the core's field names to them: num_samples → n, ...)."""
    if exc.field is None:
        return OpenAIError(exc.status, str(exc))
    param = (names or {}).get(exc.field, exc.field)
    if exc.status == 404:
        return OpenAIError(404, str(exc), param=param)
    return invalid(param, str(exc))


# -- request schemas -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding fields against side channels; we send none


class CommonRequest(BaseModel):
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


# `prompt` and `messages` are checked by hand (parse_prompt, render_chat); their published
# schemas say what those accept.
_TOKENS = {"type": "array", "items": {"type": "integer"}}
PromptField = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}}, _TOKENS, {"type": "array", "items": _TOKENS},
]})]
MessagesField = Annotated[list[Any], WithJsonSchema({"type": "array", "items": {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [
            {"type": "string"}, {"type": "null"},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
        ]},
        "name": {"type": "string"},
    },
}})]


class CompletionRequest(CommonRequest):
    prompt: PromptField
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(CommonRequest):
    messages: MessagesField
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


def request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` itself (parse_request): its JSON
    schema with the nested models written out in place, since a route's schema cannot point
    into pydantic's `$defs`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"required": True, "content": {"application/json": {"schema": inline(schema)}}}


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
    except RecursionError:
        raise OpenAIError(400, "the request body is nested too deeply to be parsed as JSON") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    if has_unpaired_surrogate(data):
        raise OpenAIError(400, UNPAIRED_SURROGATE)
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


def sampling_params(req: CommonRequest, max_tokens: int | None) -> tuple[SamplingParams, int]:
    """The request's sampling knobs in engine terms (OpenAI's defaults filled in), and n."""
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k in (None, 0) else req.top_k,
        seed=req.seed,
        stop_strings=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
    )
    return params, 1 if req.n is None else req.n


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


