"""Input an attacker (or a buggy client) sends: refused with a 4xx JSON error or a `user`
failure that names what was wrong, never a 500, never another user's request failing with
it, never a training client stalled by it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tinker
from test_protocol_and_errors import (
    BASE,
    HEADERS,
    TOKENS,
    fb_loss,
    fwdbwd_body,
    new_model,
    new_session,
    optim_body,
    post,
    wait_result,
)
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

LONG_POLL = 30  # past one long poll (25 s): a request that will never run times out here


def sample_body(sampler: str, **extra) -> dict:
    return {"num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS, "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 4}, "sampling_session_id": sampler, "seq_id": None, "type": "sample", **extra}


def failure(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), "a result, not a failure"
    return response.json()


# -- one user's request never fails another's ------------------------------------------------


def test_a_bad_sample_request_fails_alone_and_names_its_field(server):
    """A prompt_logprobs_last_n of -10**12 used to reach the engine's shared prefill and fail
    every request prefilled with it (MemoryError, category server)."""
    other = tinker.ServiceClient(base_url=server.base_url).create_sampling_client(base_model=BASE)
    session = new_session(server)
    post(server, "/api/v1/create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE})
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(other.sample, types.ModelInput.from_ints(TOKENS), 1, params) for _ in range(4)]
        bad = pool.submit(post, server, "/api/v1/asample",
                          sample_body(f"{session}:sample:0", prompt_logprobs=True, prompt_logprobs_last_n=-10**12))
        good += [pool.submit(other.sample, types.ModelInput.from_ints(TOKENS), 1, params) for _ in range(4)]
        results = [f.result().result() for f in good]
        refused = failure(wait_result(server, bad.result().json()["request_id"]))
    assert all(1 <= len(r.sequences[0].tokens) <= 4 for r in results)  # .result() raised for none of them
    assert refused["category"] == "user" and "prompt_logprobs_last_n" in refused["error"], refused


@pytest.mark.parametrize("field", ["topk_prompt_logprobs", "topk_sample_logprobs"])
def test_top_k_logprobs_past_the_limit_are_a_user_error_naming_the_limit(server, field):
    session = new_session(server)
    post(server, "/api/v1/create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE})
    r = post(server, "/api/v1/asample", sample_body(f"{session}:sample:0", prompt_logprobs=True, **{field: 1_000_000}))
    refused = failure(wait_result(server, r.json()["request_id"]))
    assert refused["category"] == "user"
    assert field in refused["error"] and "between 0 and 256" in refused["error"], refused


def test_an_openai_call_is_bounded_in_the_tokens_it_samples_in_all(server):
    r = httpx.post(server.base_url + "/v1/completions", headers=HEADERS, timeout=30, json={
        "model": BASE, "prompt": [[1, 2]] * 256, "max_tokens": 8000, "n": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens" and "1048576" in r.json()["error"]["message"]


# -- training: every refusal uses up its seq_id; seq_id 0 is not a request -------------------


def test_a_training_request_refused_while_parsing_still_uses_up_its_seq_id(server):
    session = new_session(server)
    model = new_model(server, session)
    first = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 1, TOKENS), proto=True)
    refused = post(server, "/api/v1/save_weights", {"model_id": model, "path": "x", "seq_id": 2, "ttl_seconds": 1.5})
    assert refused.status_code == 400 and "ttl_seconds" in refused.json()["detail"]
    malformed = pb.ForwardBackwardRequest.FromString(fwdbwd_body(model, 3, TOKENS))
    malformed.data[0].loss_fn_inputs["weights"].dense = b"\x00\x00\x80"  # not whole float32 values
    refused = post(server, "/api/v1/forward_backward", malformed.SerializeToString(), proto=True)
    assert refused.status_code == 400 and "data[0].loss_fn_inputs['weights']" in refused.json()["detail"]
    step = post(server, "/api/v1/optim_step", optim_body(model, 4))
    after = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 5, TOKENS, forward_only=True), proto=True)
    assert np.isfinite(fb_loss(wait_result(server, first.json()["request_id"])))
    assert "metrics" in wait_result(server, step.json()["request_id"], deadline=LONG_POLL).json()
    assert np.isfinite(fb_loss(wait_result(server, after.json()["request_id"], deadline=LONG_POLL)))


def test_a_save_ttl_past_ten_years_is_refused_and_uses_up_its_seq_id(server):
    session = new_session(server)
    model = new_model(server, session)
    refused = post(server, "/api/v1/save_weights", {"model_id": model, "path": "x", "seq_id": 1, "ttl_seconds": 10**12})
    assert refused.status_code == 400 and "ttl_seconds must be between 1 and 315360000" in refused.json()["detail"]
    step = post(server, "/api/v1/optim_step", optim_body(model, 2))
    assert "metrics" in wait_result(server, step.json()["request_id"], deadline=LONG_POLL).json()


def test_forward_backward_with_seq_id_0_is_refused(server):
    session = new_session(server)
    model = new_model(server, session)
    r = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 0, TOKENS), proto=True)
    assert r.status_code == 400 and "seq_id" in r.json()["detail"], r.text
    ok = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 1, TOKENS), proto=True)
    assert np.isfinite(fb_loss(wait_result(server, ok.json()["request_id"])))


def test_lora_rank_is_bounded_before_anything_is_allocated(server):
    sc = tinker.ServiceClient(base_url=server.base_url)
    with pytest.raises(tinker.BadRequestError, match=r"rank must be between 1 and 512, got 1000000"):
        sc.create_lora_training_client(base_model=BASE, rank=1_000_000).result()
    with pytest.raises(tinker.BadRequestError, match=r"seed"):
        sc.create_lora_training_client(base_model=BASE, rank=4, seed=2**70).result()


# -- bodies that used to answer 500 -----------------------------------------------------------


JSON_ROUTES = [
    ("POST", "/api/v1/create_session"),
    ("POST", "/api/v1/asample"),
    ("POST", "/api/v1/save_weights"),
    ("POST", "/api/v1/weights_info"),
    ("PUT", "/api/v1/training_runs/r/checkpoints/weights/c/ttl"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/oai/api/v1/completions"),
]


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("method, path", JSON_ROUTES)
def test_deeply_nested_json_is_a_400(server, method, path, depth):
    body = b"[" * depth + b"]" * depth
    r = httpx.request(method, server.base_url + path, content=body, timeout=30,
                      headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.text


@pytest.mark.parametrize("route", ["/api/v1/checkpoints", "/api/v1/training_runs", "/api/v1/sessions"])
def test_a_huge_pagination_offset_is_a_400(server, route):
    r = httpx.get(server.base_url + route, params={"offset": 9223372036854775808}, headers=HEADERS, timeout=30)
    assert r.status_code == 400 and "offset must be at most" in r.json()["detail"], r.text
    r = httpx.get(server.base_url + "/api/v1/training_runs/r/metrics", params={"after_id": 2**63}, headers=HEADERS, timeout=30)
    assert r.status_code == 422 and "after_id" in r.json()["detail"], r.text
    assert httpx.get(server.base_url + route, params={"limit": 10**30}, headers=HEADERS, timeout=30).status_code == 200


def _tensor(msg: pb.ForwardBackwardRequest) -> pb.Tensor:
    return msg.data[0].loss_fn_inputs["weights"]


def _bad_dense(msg):
    _tensor(msg).dense = b"\x00" * 7


def _bad_shape(msg):
    del _tensor(msg).shape[:]
    _tensor(msg).shape.extend([3, 5])


def _negative_shape(msg):
    del _tensor(msg).shape[:]
    _tensor(msg).shape.extend([-2, -5])


def _bfloat16_odd_bytes(msg):
    _tensor(msg).dtype = pb.DTYPE_BFLOAT16
    _tensor(msg).dense = b"\x00" * 3


def _sparse(shape, crow, col, values):
    def mutate(msg):
        t = _tensor(msg)
        t.ClearField("dense")
        del t.shape[:]
        t.shape.extend(shape)
        t.sparse_csr.crow_indices = np.asarray(crow, np.int64).tobytes()
        t.sparse_csr.col_indices = np.asarray(col, np.int64).tobytes()
        t.sparse_csr.values = np.asarray(values, np.float32).tobytes()
    return mutate


def _odd_token_bytes(msg):
    msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x00\x00"


@pytest.mark.parametrize("mutate, message", [
    (_bad_dense, "whole number"),
    (_bad_shape, "do not fill shape"),
    (_negative_shape, "negative dimension"),
    (_bfloat16_odd_bytes, "whole number"),
    (_sparse([2**16, 2**16], [0, 0], [], []), "more than 16777216 in one tensor"),  # the 8 GB ask of a tiny body
    (_sparse([2, 4], [0, 2, 1], [0, 1], [1.0, 1.0]), "inconsistent sparse CSR"),
    (_sparse([2, 4], [0, 1, 2], [0, 9], [1.0, 1.0]), "inconsistent sparse CSR"),
    (_odd_token_bytes, "model_input tokens"),
])
def test_malformed_tensors_in_a_protobuf_body_are_a_400(server, mutate, message):
    session = new_session(server)
    model = new_model(server, session)
    msg = pb.ForwardBackwardRequest.FromString(fwdbwd_body(model, 1, TOKENS))
    mutate(msg)
    r = post(server, "/api/v1/forward_backward", msg.SerializeToString(), proto=True)
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]
    ok = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 2, TOKENS), proto=True)
    assert np.isfinite(fb_loss(wait_result(server, ok.json()["request_id"], deadline=LONG_POLL)))


# -- body size ---------------------------------------------------------------------------------


def test_a_json_body_past_the_limit_is_a_413(server):
    big = b'{"tags": [], "user_metadata": {"x": "' + b"a" * (9 << 20) + b'"}}'
    r = httpx.post(server.base_url + "/api/v1/create_session", content=big, timeout=60,
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: refused once the bytes received pass the limit
        for _ in range(10):
            yield b" " * (1 << 20)

    r = httpx.post(server.base_url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["error"]["message"]
    # A forward_backward body of that size is within its own (protobuf) limit.
    r = post(server, "/api/v1/forward_backward", b"\xff" * (9 << 20), proto=True)
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]


# -- text that is not text ---------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/api/v1/session_heartbeat", '{"session_id": "\\ud800"}'),  # found by tests/fuzz: a 500 from the database
    ("/api/v1/create_session", '{"tags": ["a\\udc00"], "user_metadata": {}, "sdk_version": "0.38.0"}'),
    ("/v1/completions", '{"model": "' + BASE + '", "prompt": "\\ud800", "max_tokens": 1}'),
])
def test_a_string_with_an_unpaired_surrogate_is_a_400(server, path, body):
    r = httpx.post(server.base_url + path, content=body.encode(), timeout=30,
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "unpaired surrogate" in r.text


def test_optim_step_without_seq_id_is_a_400(server):
    """It used to step the optimizer and then fail as a server error recording its metrics
    (found by tests/fuzz)."""
    model = new_model(server, new_session(server))
    body = optim_body(model, 1)
    del body["seq_id"]
    r = post(server, "/api/v1/optim_step", body)
    assert r.status_code == 400 and "seq_id" in r.json()["detail"], r.text
    step = post(server, "/api/v1/optim_step", optim_body(model, 1))
    assert "metrics" in wait_result(server, step.json()["request_id"], deadline=LONG_POLL).json()
