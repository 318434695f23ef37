"""Schemathesis over the OpenAI routes, from the OpenAPI schema the server publishes: bodies that
fit the schema and bodies that break it, through one keep-alive connection."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from fuzzing import BASE, HEADERS, assert_still_serving, check_answer, describe, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from tinkerd.api.openai_protocol import _NEUTRAL as REFUSED_UNLESS_NEUTRAL

pytestmark = pytest.mark.fuzz

OPENAI_PATHS = r"^/(v1|oai/api/v1)/"
# The model is a real 135M model on CPU: every sampled token costs milliseconds.
MAX_TOKENS, MAX_N = 4, 2


def openai_schema(server) -> schemathesis.BaseSchema:
    published = httpx.get(server.base_url + "/openapi.json", headers=HEADERS, timeout=30).json()
    assert published["paths"]["/v1/chat/completions"]["post"]["requestBody"]["required"]
    # Steer the bodies that fit the schema to the sampling path: they name the served model and
    # leave out the fields this server refuses unless neutral. The bodies that break the schema
    # still send any model name, those fields, and unknown ones.
    for path in ("/v1/completions", "/v1/chat/completions", "/oai/api/v1/completions", "/oai/api/v1/chat/completions"):
        body = published["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"const": BASE}
        for name in REFUSED_UNLESS_NEUTRAL:
            body["properties"].pop(name, None)
        body["additionalProperties"] = False
        # and ask for a few tokens of a few choices, from prompts of real token ids.
        small = {"n": (1, MAX_N), "max_tokens": (1, MAX_TOKENS), "max_completion_tokens": (1, MAX_TOKENS),
                 "logprobs": (0, 5), "top_logprobs": (0, 5)}
        for name, (low, high) in small.items():
            if name in body["properties"]:
                body["properties"][name] = {"anyOf": [{"type": "integer", "minimum": low, "maximum": high}, {"type": "null"}]}
        if "prompt" in body["properties"]:
            token = {"type": "integer", "minimum": 0, "maximum": 49151}
            body["properties"]["prompt"] = {"anyOf": [
                {"type": "string", "maxLength": 200}, {"type": "array", "items": token, "minItems": 1, "maxItems": 16}]}
    return schemathesis.openapi.from_dict(published).include(path_regex=OPENAI_PATHS)


def bounded(body: Any) -> Any:
    """The body with its sampling cut to a few tokens; values the server must refuse are kept."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS and value <= 1 << 21:
            body[key] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # chat's default is the rest of the context
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and MAX_N < n <= 1024:
        body["n"] = MAX_N
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
        body["prompt"] = body["prompt"][:4]
    return body


def test_openai_routes_answer_every_generated_request_below_500(fuzz_server):
    schema = openai_schema(fuzz_server)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    # One connection for every example: an answer that closed it would fail the next request.
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120,
                      limits=httpx.Limits(max_connections=1)) as client:

        @fuzz_settings()
        @given(case=cases)
        def fuzz(case):
            content = None
            headers = {k: v for k, v in (case.headers or {}).items() if isinstance(v, str)}
            if not isinstance(case.body, NotSet):
                body = bounded(case.body)
                content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
                headers.setdefault("Content-Type", case.media_type or "application/json")
            headers.pop("X-API-Key", None)
            response = client.request(case.method, case.formatted_path, params=case.query or None, content=content,
                                      headers=headers)
            check_answer(response, describe(case.method, case.formatted_path, content))

        fuzz()
    assert_still_serving(fuzz_server)
    from openai import OpenAI

    completion = OpenAI(base_url=fuzz_server.base_url + "/v1", api_key=HEADERS["X-API-Key"]).completions.create(
        model=BASE, prompt="Hello", max_tokens=2)
    assert completion.choices[0].text is not None
