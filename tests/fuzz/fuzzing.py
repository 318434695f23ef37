"""What the fuzz tier shares: Hypothesis settings, hostile values, and what every answer must be.

Each example is one HTTP request to the tier's one server. Whatever it sends, the answer is
below 500, and a 4xx carries a JSON body whose message says what was wrong. After each test,
the server process is still up and an ordinary SDK request succeeds.

The runs are fixed (derandomized) and short by default, so CI sees the same examples each
time. To search longer, and differently each run:

    TINKERD_FUZZ_EXAMPLES=2000 TINKERD_FUZZ_RANDOM=1 .venv/bin/python -m pytest -m fuzz tests/fuzz
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
HEADERS = {"X-API-Key": "tml-test"}
EXAMPLES = int(os.environ.get("TINKERD_FUZZ_EXAMPLES", "60"))


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    return settings(
        max_examples=examples,
        derandomize=not os.environ.get("TINKERD_FUZZ_RANDOM"),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# -- hostile values ----------------------------------------------------------------------------

TEN_MB = "a" * (10 << 20)  # past every JSON body's limit: a 413
ONE_MB = "\u00e9" * (1 << 19)  # within it: reaches the route
NAN, INF = math.nan, math.inf

HOSTILE_SCALARS = [
    None, True, False, 0, -1, 1, -(2**31), 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30),
    1e308, -1e308, 5e-324, -0.0, 0.5, NAN, INF, -INF,
    "", " ", "\x00", "\ud800", "\uffff", "null", "NaN", "-1", "1e999", "0x10", "a" * 300,
    "../../../../etc/passwd", "/", "tinker://", "tinker://x/weights/../../../x", "tinker://../../x/sampler_weights/y",
    "%00", "a/b\\c", "tml-test", ONE_MB,
]

# One of each kind above, [] and {}: for the per-field sweeps of the newer routes.
FEW_HOSTILE_SCALARS = [
    None, True, -1, 2**64, NAN, INF, "", "\x00", "\ud800", "a" * 300, "tinker://x/weights/../../../x", [], {},
]


def hostile_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """Wrong types, extreme numbers, NaN and infinities, odd and huge strings, nested shapes."""
    scalars = st.one_of(
        st.sampled_from([*HOSTILE_SCALARS, TEN_MB]),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
    )
    if depth <= 0:
        return scalars
    inner = hostile_values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4),
    )


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: dict keys and list indices, outermost first."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(value[head], rest, new)
    return copy


def _drop(value: Any, path: tuple) -> Any:
    """`value` without the dict key (or list item) at `path`."""
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    return {**value, path[0]: _drop(value[path[0]], path[1:])} if isinstance(value, dict) else \
        [_drop(v, path[1:]) if i == path[0] else v for i, v in enumerate(value)]


@st.composite
def mutated(draw, body: Any) -> Any:
    """`body` with one to three changes: a value replaced by a hostile one, a field dropped, an
    unknown field added."""
    for _ in range(draw(st.integers(1, 3))):
        places = _paths(body)
        place = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "drop" and place:
            body = _drop(body, place)
        elif action == "add":
            containers = [p for p in places if isinstance(_get(body, p), dict)]
            if containers:
                where = draw(st.sampled_from(containers))
                key = draw(st.sampled_from(["extra", "type", "__proto__", "seq_id", ""]) | st.text(max_size=8))
                body = _replace(body, where, {**_get(body, where), key: draw(hostile_values(1))})
        else:
            body = _replace(body, place, draw(hostile_values()))
    return body


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def raw_json(draw, body: Any) -> bytes:
    """`body` as bytes, JSON or not quite: NaN and infinities as Python writes them, and now and
    then invalid UTF-8, a cut-off document, or nesting deeper than any parser recurses."""
    data = json.dumps(body, allow_nan=True).encode()
    how = draw(st.sampled_from(["as is"] * 6 + ["invalid utf-8", "cut off", "deep", "empty"]))
    if how == "invalid utf-8":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + data[at:]
    if how == "cut off":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "deep":
        depth = draw(st.sampled_from([1_000, 50_000]))
        return b'{"a":' * depth + b"1" + b"}" * depth
    if how == "empty":
        return b""
    return data


# -- what every answer must be ---------------------------------------------------------------


def error_message(response: httpx.Response) -> str:
    """The message of an error answer, in either door's shape."""
    body = response.json()
    if isinstance(body.get("error"), dict):  # OpenAI's {"error": {"message", "type", "param", "code"}}
        return body["error"]["message"]
    return body["detail"]


def check_answer(response: httpx.Response, sent: str) -> None:
    assert response.status_code < 500, f"{sent} answered {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), \
            f"{sent} answered {response.status_code} without JSON: {response.text[:300]}"
        message = error_message(response)
        assert isinstance(message, str) and message.strip(), f"{sent}: an error that names nothing: {response.text[:300]}"


def describe(method: str, path: str, content: bytes | None = None) -> str:
    shown = "" if content is None else f" {content[:200]!r}{'...' if len(content) > 200 else ''}"
    return f"{method} {path}{shown}"


def assert_still_serving(server) -> None:
    """The process is up, and an ordinary SDK sample succeeds."""
    import tinker
    from tinker import types

    assert server.proc.poll() is None, f"tinkerd exited:\n{server.log_text()[-3000:]}"
    sampler = tinker.ServiceClient(base_url=server.base_url, api_key=HEADERS["X-API-Key"]).create_sampling_client(base_model=BASE)
    result = sampler.sample(types.ModelInput.from_ints([1, 504, 3458]), 1, types.SamplingParams(max_tokens=2, seed=1)).result()
    assert 1 <= len(result.sequences[0].tokens) <= 2
