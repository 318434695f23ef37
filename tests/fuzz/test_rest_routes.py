"""The REST routes (RestClient, the CLI, the console) under fuzzed path segments, query values
and bodies: real ids now and then, hostile ones otherwise."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from fuzzing import (
    BASE,
    EXAMPLES,
    FEW_HOSTILE_SCALARS,
    HEADERS,
    HOSTILE_SCALARS,
    assert_still_serving,
    check_answer,
    describe,
    fuzz_settings,
    hostile_values,
    raw_json,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

# (method, path template, query parameters it reads, whether it reads a JSON body)
ROUTES = [
    ("GET", "/api/v1/training_runs", ["limit", "offset", "base_model", "search", "access_scope"], False),
    ("GET", "/api/v1/training_runs/{run}", [], False),
    ("GET", "/api/v1/training_runs/{run}/metrics", ["after_id"], False),
    ("GET", "/api/v1/training_runs/{run}/checkpoints", [], False),
    ("GET", "/api/v1/checkpoints", ["limit", "offset", "access_scope"], False),
    ("DELETE", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}", [], False),
    ("POST", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/publish", [], False),
    ("DELETE", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/publish", [], False),
    ("PUT", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/ttl", [], True),
    ("GET", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/external_weights_urls", [], False),
    ("GET", "/api/v1/signed_download", ["token"], False),
    ("GET", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/archive", [], False),
    ("GET", "/api/v1/signed_archive", ["token"], False),
    ("POST", "/api/v1/weights_info", [], True),
    ("GET", "/api/v1/sessions", ["limit", "offset", "access_scope"], False),
    ("GET", "/api/v1/sessions/{session}", [], False),
    ("POST", "/api/v1/sessions/{session}/finish", [], False),
    ("GET", "/api/v1/samplers/{sampler}", [], False),
    ("GET", "/api/v1/server_status", [], False),
    ("GET", "/v1/models/{model}", [], False),
]

hostile_text = st.one_of(
    st.sampled_from([v for v in HOSTILE_SCALARS if isinstance(v, str) and len(v) < 1000]),
    st.text(max_size=30),
    st.sampled_from(["..", ".", "%2e%2e", "%2F", "%00", "%ff", "%ed%a0%80", "a%2Fb"]),
)
query_values = st.one_of(
    hostile_text,
    st.integers().map(str),
    st.sampled_from(["-1", "9223372036854775808", "1e400", "nan", "inf", "accessible", "owned", "all", "0x1f", " 1"]),
)


def segment(draw, real: list[str]) -> str:
    """A path segment: a real id, or hostile text (percent-escaped, or raw escapes as sent)."""
    value = draw(st.sampled_from(real) | hostile_text)
    # surrogatepass: a lone surrogate goes out as the bytes of one (%ED%A0%80), not valid UTF-8
    return value if value.startswith("%") or not value else quote(value, safe="", errors="surrogatepass")


def test_rest_routes_answer_fuzzed_paths_queries_and_bodies_below_500(fuzz_server, world):
    real = {
        "run": [world.run_id], "kind": ["weights", "sampler_weights", "external_weights"], "name": ["fuzz"],
        "session": [world.session_id], "sampler": [world.sampler_id], "model": [world.sampler_path],
    }
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120,
                      limits=httpx.Limits(max_connections=1)) as client:

        @fuzz_settings()
        @given(route=st.sampled_from(ROUTES), data=st.data())
        def fuzz(route, data):
            method, template, query_names, has_body = route
            path = template
            for name, ids in real.items():
                if "{" + name + "}" in path:
                    # A delete aims only at made-up checkpoints: the world's ones serve the other examples.
                    path = path.replace("{" + name + "}", segment(data.draw, ids if method != "DELETE" else ["gone"]))
            query = {name: data.draw(query_values) for name in query_names if data.draw(st.booleans())}
            content = None
            if has_body:
                body = data.draw(st.one_of(
                    st.fixed_dictionaries({"ttl_seconds": hostile_values()}),
                    st.fixed_dictionaries({"tinker_path": st.sampled_from([world.weights_path, world.sampler_path]) | hostile_values()}),
                    hostile_values(),
                ))
                content = data.draw(raw_json(body))
            raw_path = path + ("?" + "&".join(f"{quote(k)}={quote(v, safe='%', errors='surrogatepass')}" for k, v in query.items()) if query else "")
            request = client.build_request(method, raw_path, content=content,
                                           headers={"Content-Type": "application/json"} if content is not None else None)
            response = client.send(request)
            check_answer(response, describe(method, raw_path, content))

        fuzz()
    assert_still_serving(fuzz_server)


def test_ttl_and_weights_info_take_every_hostile_value(fuzz_server, world):
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120) as client:
        ttl_path = world.weights_path.replace("tinker://", "/api/v1/training_runs/").replace("/weights/", "/checkpoints/weights/") + "/ttl"
        for value in HOSTILE_SCALARS:
            for method, path, body in [("PUT", ttl_path, {"ttl_seconds": value}),
                                       ("POST", "/api/v1/weights_info", {"tinker_path": value})]:
                content = json.dumps(body, allow_nan=True).encode()
                response = client.request(method, path, content=content, headers={"Content-Type": "application/json"})
                check_answer(response, describe(method, path, content))
    assert_still_serving(fuzz_server)


# -- the newer routes ----------------------------------------------------------------------------
# (method, path template, query parameters it reads, the fields of its JSON body or None), fuzzed
# by tests of their own so the run above keeps its examples for the older routes.
NEWER_ROUTES = [
    ("POST", "/api/v1/checkpoints/search",
     [], ["project_ids", "user_metadata", "checkpoint_type", "owner", "base_models", "limit", "cursor"]),
    ("PUT", "/api/v1/sessions/{session}/project", [], ["project_id"]),
    ("POST", "/api/v1/external_weights_upload_start", [], ["base_model", "lora_config", "destination_project_id"]),
    ("POST", "/api/v1/external_weights_upload_finish", [], ["upload_id"]),
    ("GET", "/api/v1/billing/usage/checkpoints/current", ["project_id"], None),
    ("GET", "/api/v1/audit", ["event_type", "day"], None),
    ("GET", "/api/v1/sessions/{session}/trace_export", [], None),
    ("POST", "/api/v1/auth/token", [], None),
    ("GET", "/api/v1/auth/apikey/me", [], None),
]

# Values that pass a field's first check now and then, so a fuzzed body reaches further in.
PLAUSIBLE = {
    "checkpoint_type": st.sampled_from(["training", "sampler", "external"]),
    "owner": st.sampled_from([{"type": "own"}, {"type": "accessible"}, {"type": "user", "owner_urns": ["user:tinkerd"]}]),
    "limit": st.integers(-1, 300),
    "cursor": st.fixed_dictionaries({"last_created_at": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01", "x"]),
                                     "last_checkpoint_uuid": st.sampled_from(["1", "-1", "9" * 40, "x"])}),
    "base_model": st.just(BASE),
    "lora_config": st.fixed_dictionaries({"rank": st.integers(-1, 600)}, optional={"train_attn": hostile_values(0)}),
    "upload_id": st.sampled_from(["upload-" + "0" * 32, "upload-../../x", "upload-"]),
    "event_type": st.sampled_from(["all", "create", "delete"]),
    "day": st.sampled_from(["2026-01-01", "2026-13-45", "0000-00-00", "today"]),
}


def newer_body(draw, fields: list[str]) -> object:
    if not draw(st.integers(0, 4)):
        return draw(hostile_values())
    chosen = [f for f in fields if draw(st.booleans())]
    return {f: draw(PLAUSIBLE[f] | hostile_values() if f in PLAUSIBLE else hostile_values()) for f in chosen}


def send(client: httpx.Client, method: str, path: str, query: dict[str, str], content: bytes | None) -> httpx.Response:
    raw_path = path + ("?" + "&".join(f"{quote(k)}={quote(v, safe='%', errors='surrogatepass')}" for k, v in query.items()) if query else "")
    request = client.build_request(method, raw_path, content=content,
                                   headers={"Content-Type": "application/json"} if content is not None else None)
    response = client.send(request)
    check_answer(response, describe(method, raw_path, content))
    return response


def test_newer_rest_routes_answer_fuzzed_paths_queries_and_bodies_below_500(fuzz_server, world):
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120,
                      limits=httpx.Limits(max_connections=1)) as client:

        @fuzz_settings(EXAMPLES // 2)  # few routes, and their fields each swept below
        @given(route=st.sampled_from(NEWER_ROUTES), data=st.data())
        def fuzz(route, data):
            method, path, query_names, fields = route
            path = path.replace("{session}", segment(data.draw, [world.session_id]))
            query = {name: data.draw(PLAUSIBLE.get(name, query_values) | query_values)
                     for name in query_names if data.draw(st.booleans())}
            content = None if fields is None else data.draw(raw_json(newer_body(data.draw, fields)))
            send(client, method, path, query, content)

        fuzz()
    assert_still_serving(fuzz_server)


def test_a_hostile_value_of_each_kind_in_every_field_and_query_of_the_newer_rest_routes(fuzz_server, world):
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120) as client:
        for method, template, query_names, fields in NEWER_ROUTES:
            path = template.replace("{session}", world.session_id)
            for field in [*(fields or []), "unknown_field"] if fields is not None else []:
                for value in FEW_HOSTILE_SCALARS:
                    send(client, method, path, {}, json.dumps({field: value}, allow_nan=True).encode())
            for name in query_names:
                for value in FEW_HOSTILE_SCALARS:
                    if isinstance(value, str):
                        send(client, method, path, {name: value}, None)
    assert_still_serving(fuzz_server)
