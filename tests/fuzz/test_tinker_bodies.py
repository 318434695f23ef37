"""The Tinker routes under fuzzed bodies: JSON bodies shaped by the SDK's own pydantic request
types (tinker.types), then mutated with hostile values, and protobuf forward_backward bodies
built by the SDK, then mutated, cut off or garbled."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from fuzzing import (
    BASE,
    EXAMPLES,
    FEW_HOSTILE_SCALARS,
    HEADERS,
    HOSTILE_SCALARS,
    ONE_MB,
    TEN_MB,
    assert_still_serving,
    check_answer,
    describe,
    fuzz_settings,
    mutated,
    raw_json,
)
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from tinker import types as T
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

pytestmark = pytest.mark.fuzz

JSON_ROUTES: dict[str, type] = {
    "/api/v1/create_session": T.CreateSessionRequest,
    "/api/v1/session_heartbeat": T.SessionHeartbeatRequest,
    "/api/v1/create_model": T.CreateModelRequest,
    "/api/v1/get_info": T.GetInfoRequest,
    "/api/v1/optim_step": T.OptimStepRequest,
    "/api/v1/save_weights": T.SaveWeightsRequest,
    "/api/v1/save_weights_for_sampler": T.SaveWeightsForSamplerRequest,
    "/api/v1/save_weights_external": T.SaveWeightsExternalRequest,
    "/api/v1/load_weights": T.LoadWeightsRequest,
    "/api/v1/create_sampling_session": T.CreateSamplingSessionRequest,
    "/api/v1/asample": T.SampleRequest,
    "/api/v1/retrieve_future": T.FutureRetrieveRequest,
}
# Routes added after the ones above, fuzzed by tests of their own so the runs above keep their
# examples (and their time) for the older routes.
NEWER_JSON_ROUTES: dict[str, type] = {
    "/api/v1/copy_weights": T.CopyWeightsRequest,
    "/api/v1/retrieve_futures": T.FuturesRetrieveRequest,
    "/api/v1/join_sampling_session": T.JoinSamplingSessionRequest,
    "/api/v1/sessions/search": T.SessionSearchRequest,
    "/api/v1/create_custom_loss": T.CreateCustomLossRequest,
}


def sdk_bodies(routes: dict[str, type] = JSON_ROUTES) -> st.SearchStrategy:
    """(path, body) pairs that fit the SDK's request types, generated from their JSON schemas."""
    components: dict[str, Any] = {}
    paths = {}
    for path, model in routes.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        paths[path] = {"post": {
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"200": {"description": "accepted"}},
        }}
    document = {"openapi": "3.1.0", "info": {"title": "tinker", "version": "0.38"}, "paths": paths,
                "components": {"schemas": components}}
    cases = schemathesis.openapi.from_dict(document).as_strategy(GenerationMode.POSITIVE)
    return cases.map(lambda case: (case.path, case.body))


def aimed(draw, body: Any, world) -> Any:
    """Ids swapped for the world's real ones now and then, and sampling kept to a few tokens."""
    if not isinstance(body, dict):
        return body
    real = {
        "session_id": [world.session_id], "model_id": [world.model_id], "sampling_session_id": [world.sampler_id],
        "base_model": [BASE], "model_path": [world.sampler_path], "path": [world.weights_path, world.sampler_path, "fuzz"],
        "source_path": [world.weights_path, world.sampler_path],
    }
    body = dict(body)
    for key, choices in real.items():
        if key in body and draw(st.booleans()):
            body[key] = draw(st.sampled_from(choices))
    target = body.get("target")  # retrieve_futures
    if isinstance(target, dict) and draw(st.booleans()):
        body["target"] = {**target, "sampling_session_id": world.sampler_id}
    lora = body.get("lora_config")
    if isinstance(lora, dict) and isinstance(lora.get("rank"), int) and 1 < lora["rank"] <= 512:
        body["lora_config"] = {**lora, "rank": 1}  # each model created holds its adapter's memory
    params = body.get("sampling_params")
    if isinstance(params, dict):
        max_tokens = params.get("max_tokens")
        if max_tokens is None or (isinstance(max_tokens, int) and 4 < max_tokens <= 1 << 21):
            body["sampling_params"] = {**params, "max_tokens": 4}
    if isinstance(body.get("num_samples"), int) and 2 < body["num_samples"] <= 128:
        body["num_samples"] = 2
    return body


def post(client: httpx.Client, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    response = client.post(path, content=content, headers={"Content-Type": content_type})
    check_answer(response, describe("POST", path, content))
    return response


def check_outcome(client: httpx.Client, response: httpx.Response, sent: str, wait: bool) -> None:
    """An accepted request that later fails, fails as the user's fault, never the server's.

    `wait`: until it is done (a sample); else one look (a training request may wait forever
    on a fuzzed seq_id before it)."""
    if response.status_code != 200 or not isinstance(response.json(), dict) or "request_id" not in response.json():
        return
    for _ in range(150 if wait else 1):  # the server's long poll is 0.2 s
        outcome = client.post("/api/v1/retrieve_future", json={"request_id": response.json()["request_id"]})
        check_answer(outcome, "retrieve_future")
        if not outcome.headers["content-type"].startswith("application/json") or outcome.json().get("type") != "try_again":
            break
    if outcome.headers["content-type"].startswith("application/json") and "error" in outcome.json():
        assert outcome.json()["category"] == "user", f"{sent} failed as the server's fault: {outcome.text[:500]}"


def fuzz_sdk_shaped_bodies(server, world, routes: dict[str, type], examples: int) -> None:
    """POST SDK-shaped bodies of `routes`, aimed at real ids, mutated half the time, and check
    that every answer is below 500 and the server still serves."""
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=120,
                      limits=httpx.Limits(max_connections=1)) as client:

        @fuzz_settings(examples)
        @given(route=sdk_bodies(routes), data=st.data())
        def fuzz(route, data):
            path, body = route
            body = aimed(data.draw, body, world)
            if data.draw(st.booleans()):
                body = data.draw(mutated(body))
            content = data.draw(raw_json(body))
            response = post(client, path, content)
            check_outcome(client, response, describe("POST", path, content), wait=path == "/api/v1/asample")

        fuzz()
    assert_still_serving(server)


def test_tinker_json_routes_answer_sdk_shaped_and_mutated_bodies_below_500(fuzz_server, world):
    fuzz_sdk_shaped_bodies(fuzz_server, world, JSON_ROUTES, EXAMPLES)


def test_newer_tinker_json_routes_answer_sdk_shaped_and_mutated_bodies_below_500(fuzz_server, world):
    fuzz_sdk_shaped_bodies(fuzz_server, world, NEWER_JSON_ROUTES, EXAMPLES // 2)  # few routes, each field swept below


# -- protobuf: forward_backward ----------------------------------------------------------------

LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "stable_reinforce"]
TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30]


def sdk_forward_backward(model_id: str, seq_id: int) -> pb.ForwardBackwardRequest:
    datum = T.Datum(model_input=T.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)})
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(request)


int64s = st.one_of(st.integers(-3, 10), st.sampled_from([2**31, 2**40, 2**62, -(2**62)]), st.integers(-(2**63), 2**63 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def tensor_change(draw, tensor: pb.Tensor) -> None:
    what = draw(st.sampled_from(["dtype", "shape", "dense", "values", "sparse"]))
    if what == "dtype":
        tensor.dtype = draw(st.integers(0, 9))
    elif what == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(int64s, max_size=4)))
    elif what == "dense":
        tensor.dense = draw(st.binary(max_size=64))
    elif what == "values":
        values = draw(st.lists(floats, min_size=1, max_size=16))
        tensor.dense = np.asarray(values, np.float32).tobytes()
        del tensor.shape[:]
        tensor.shape.append(len(values))
    else:
        tensor.ClearField("dense")
        tensor.sparse_csr.values = draw(st.binary(max_size=32))
        tensor.sparse_csr.crow_indices = np.asarray(draw(st.lists(int64s, max_size=4)), np.int64).tobytes()
        tensor.sparse_csr.col_indices = np.asarray(draw(st.lists(int64s, max_size=4)), np.int64).tobytes()
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.integers(-2, 1 << 40), max_size=3)))


@st.composite
def forward_backward_bodies(draw, world) -> bytes:
    msg = sdk_forward_backward(world.model_id, draw(st.integers(3, 40)))
    for _ in range(draw(st.integers(0, 4))):
        what = draw(st.sampled_from(["model_id", "seq_id", "loss_fn", "config", "config_v2", "forward_only", "tensor",
                                     "new_tensor", "tokens", "no_data", "more_data"]))
        if what == "model_id":
            msg.model_id = draw(st.sampled_from(["", "x", f"{world.session_id}:train:9", "\u00e9" * 300]) | st.text(max_size=20))
        elif what == "seq_id":
            msg.seq_id = draw(st.integers(-(2**31), 2**31 - 1))
        elif what == "loss_fn":
            msg.loss_fn = draw(st.sampled_from(LOSSES) | st.text(max_size=20))
        elif what == "config":
            msg.loss_fn_config[draw(st.sampled_from(["clip_low_threshold", "clip_high_threshold", "beta"]) | st.text(max_size=8))] = \
                draw(floats)
        elif what == "config_v2":
            value = msg.loss_fn_config_v2[draw(st.text(max_size=8))]
            if draw(st.booleans()):
                value.text = draw(st.text(max_size=20))
            else:
                value.number = draw(floats)
        elif what == "forward_only":
            msg.forward_only = draw(st.booleans())
        elif what == "tensor" and msg.data:
            name = draw(st.sampled_from(sorted(msg.data[0].loss_fn_inputs)) if msg.data[0].loss_fn_inputs else st.just("weights"))
            draw(tensor_change(msg.data[0].loss_fn_inputs[name]))
        elif what == "new_tensor" and msg.data:
            draw(tensor_change(msg.data[0].loss_fn_inputs[draw(st.sampled_from(["advantages", "logprobs", "mask"]) | st.text(max_size=8))]))
        elif what == "tokens" and msg.data and msg.data[0].model_input:
            tokens = draw(st.lists(st.sampled_from([-1, 0, 49151, 49152, 2**31 - 1]) | st.integers(0, 49151), max_size=12))
            msg.data[0].model_input[0].encoded_text.tokens = (
                np.asarray(tokens, np.int32).tobytes() if draw(st.booleans()) else draw(st.binary(max_size=16)))
        elif what == "no_data":
            del msg.data[:]
        elif what == "more_data" and msg.data:
            for _ in range(draw(st.integers(1, 3))):
                msg.data.add().CopyFrom(msg.data[0])
    body = msg.SerializeToString()
    garble = draw(st.sampled_from(["none"] * 5 + ["cut off", "flip", "random"]))
    if garble == "cut off":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif garble == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
    elif garble == "random":
        body = draw(st.binary(max_size=128))
    return body


def test_forward_backward_answers_mutated_and_truncated_protobuf_below_500(fuzz_server, world):
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120,
                      limits=httpx.Limits(max_connections=1)) as client:

        @fuzz_settings()
        @given(body=forward_backward_bodies(world), content_type=st.sampled_from(
            ["application/x-protobuf"] * 6 + ["application/json", "text/plain", ""]))
        def fuzz(body, content_type):
            response = post(client, "/api/v1/forward_backward", body, content_type)
            check_outcome(client, response, describe("POST", "/api/v1/forward_backward", body), wait=False)

        fuzz()
    assert_still_serving(fuzz_server)


def test_a_hostile_value_in_every_top_level_field_of_every_json_route(fuzz_server, world):
    """Not left to chance: each field of each SDK request type, and a field it does not have,
    with each hostile value; and a 10 MB string, which is a 413 at every route."""
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120) as client:
        for path, model in JSON_ROUTES.items():
            for field in [*model.model_fields, "unknown_field"]:
                for value in HOSTILE_SCALARS:
                    if value is not ONE_MB:  # sent by the fuzzers above; 1 MB per field and route adds up
                        post(client, path, json.dumps({field: value}, allow_nan=True).encode())
            too_large = post(client, path, json.dumps({next(iter(model.model_fields)): TEN_MB}).encode())
            assert too_large.status_code == 413 and "limit of 8388608 bytes" in too_large.json()["detail"]
    assert_still_serving(fuzz_server)


def test_a_hostile_value_of_each_kind_in_every_top_level_field_of_the_newer_json_routes(fuzz_server, world):
    """As above for the newer routes, with one hostile value of each kind (FEW_HOSTILE_SCALARS)
    to keep the tier short."""
    with httpx.Client(base_url=fuzz_server.base_url, headers=HEADERS, timeout=120) as client:
        for path, model in NEWER_JSON_ROUTES.items():
            for field in [*model.model_fields, "unknown_field"]:
                for value in FEW_HOSTILE_SCALARS:
                    post(client, path, json.dumps({field: value}, allow_nan=True).encode())
            too_large = post(client, path, json.dumps({next(iter(model.model_fields)): TEN_MB}).encode())
            assert too_large.status_code == 413 and "limit of 8388608 bytes" in too_large.json()["detail"]
    assert_still_serving(fuzz_server)
