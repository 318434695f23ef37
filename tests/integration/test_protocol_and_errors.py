"""Wire-protocol guarantees and bad input: clear errors, and the server keeps serving."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
HEADERS = {"X-API-Key": "tml-test"}


def post(server, path: str, body: dict | bytes, proto: bool = False, headers: dict | None = None) -> httpx.Response:
    h = dict(HEADERS if headers is None else headers)
    if proto:
        h["Content-Type"] = "application/x-protobuf"
        return httpx.post(server.base_url + path, content=body, headers=h, timeout=60)
    return httpx.post(server.base_url + path, json=body, headers=h, timeout=60)


def wait_result(server, request_id: str, deadline: float = 120) -> httpx.Response:
    end = time.time() + deadline
    while time.time() < end:
        r = post(server, "/api/v1/retrieve_future", {"request_id": request_id, "allow_metadata_only": False})
        if r.headers["content-type"].startswith("application/json") and r.json().get("type") == "try_again":
            continue
        return r
    raise TimeoutError(request_id)


def new_session(server) -> str:
    r = post(server, "/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def new_model(server, session_id: str, seq: int = 0, seed: int = 0) -> str:
    r = post(server, "/api/v1/create_model", {
        "session_id": session_id, "model_seq_id": seq, "base_model": BASE,
        "lora_config": {"rank": 4, "seed": seed, "train_unembed": True, "train_mlp": True, "train_attn": True},
        "type": "create_model",
    })
    assert r.status_code == 200, r.text
    assert wait_result(server, r.json()["request_id"]).status_code == 200
    return r.json()["model_id"]


def fwdbwd_body(model_id: str, seq_id: int, tokens: list[int], forward_only: bool = False, loss_fn: str = "cross_entropy") -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
        model_id=model_id, seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def fb_loss(response: httpx.Response) -> float:
    from tinker.proto.response_conv import deserialize_forward_backward_output

    assert response.headers["content-type"].startswith("application/x-protobuf"), response.text
    return deserialize_forward_backward_output(response.content).metrics["loss:sum"]


def optim_body(model_id: str, seq_id: int, lr: float = 1e-2) -> dict:
    return {"model_id": model_id, "seq_id": seq_id, "type": "optim_step", "adam_params": {
        "learning_rate": lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}}


TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1024, 2]


def test_requests_run_in_seq_id_order_even_when_they_arrive_reversed(server):
    session = new_session(server)
    model = new_model(server, session, seed=3)
    reference = new_model(server, session, seq=1, seed=3)
    initial = fb_loss(wait_result(server, post(server, "/api/v1/forward_backward", fwdbwd_body(reference, 1, TOKENS, True), proto=True).json()["request_id"]))

    # Arrival order 3, 2, 1; execution must be 1 (fwd/bwd), 2 (step), 3 (forward).
    r3 = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 3, TOKENS, forward_only=True), proto=True)
    r2 = post(server, "/api/v1/optim_step", optim_body(model, 2))
    r1 = post(server, "/api/v1/forward_backward", fwdbwd_body(model, 1, TOKENS), proto=True)
    for r in (r1, r2, r3):
        assert r.status_code == 200, r.text
    loss1 = fb_loss(wait_result(server, r1.json()["request_id"]))
    assert wait_result(server, r2.json()["request_id"]).status_code == 200
    loss3 = fb_loss(wait_result(server, r3.json()["request_id"]))
    assert loss1 == pytest.approx(initial, rel=1e-5)
    assert loss3 < initial - 1e-3  # the step ran before the forward


def test_a_retried_request_returns_the_first_result_and_runs_once(server):
    session = new_session(server)
    model = new_model(server, session, seed=4)
    body = fwdbwd_body(model, 1, TOKENS)
    first = post(server, "/api/v1/forward_backward", body, proto=True).json()
    again = post(server, "/api/v1/forward_backward", body, proto=True).json()
    assert first["request_id"] == again["request_id"]
    assert fb_loss(wait_result(server, first["request_id"])) == fb_loss(wait_result(server, again["request_id"]))
    # Ran once: the step uses one copy of the gradient, like a model that saw it once.
    twin = new_model(server, session, seq=1, seed=4)
    post(server, "/api/v1/forward_backward", fwdbwd_body(twin, 1, TOKENS), proto=True)
    for m in (model, twin):
        wait_result(server, post(server, "/api/v1/optim_step", optim_body(m, 2)).json()["request_id"])
    a = fb_loss(wait_result(server, post(server, "/api/v1/forward_backward", fwdbwd_body(model, 3, TOKENS, True), proto=True).json()["request_id"]))
    b = fb_loss(wait_result(server, post(server, "/api/v1/forward_backward", fwdbwd_body(twin, 3, TOKENS, True), proto=True).json()["request_id"]))
    assert a == pytest.approx(b, rel=1e-6)


def test_retrieve_future_long_polls(start_server):
    srv = start_server(["--long-poll-seconds", "2"])
    session = new_session(srv)
    post(srv, "/api/v1/create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": BASE, "type": "create_sampling_session"})
    sample = post(srv, "/api/v1/asample", {
        "num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS, "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 200, "temperature": 1.0, "stop": [], "seed": 1},
        "sampling_session_id": f"{session}:sample:0", "seq_id": 0, "prompt_logprobs": False, "type": "sample",
    })
    assert sample.status_code == 200 and len(sample.json()["sample_sequence_ids"]) == 1
    start = time.time()
    r = post(srv, "/api/v1/retrieve_future", {"request_id": sample.json()["request_id"], "allow_metadata_only": True})
    held = time.time() - start
    assert r.json()["type"] == "try_again"
    assert held >= 1.5  # held, not answered at once
    assert wait_result(srv, sample.json()["request_id"], deadline=900).status_code == 200


def test_idle_session_is_cleaned_up_but_checkpoints_stay(start_server):
    srv = start_server(["--session-timeout", "2"])
    session = new_session(srv)
    model = new_model(srv, session)
    saved = post(srv, "/api/v1/save_weights_for_sampler", {"model_id": model, "path": "kept", "seq_id": 1, "type": "save_weights_for_sampler"})
    path = wait_result(srv, saved.json()["request_id"]).json()["path"]
    time.sleep(6)  # no heartbeats
    gone = post(srv, "/api/v1/optim_step", optim_body(model, 2))
    assert gone.status_code == 404 and "unknown model_id" in gone.json()["detail"]
    hb = post(srv, "/api/v1/session_heartbeat", {"session_id": session, "type": "session_heartbeat"})
    assert hb.status_code == 410
    # The checkpoint outlives the session.
    sc = tinker.ServiceClient(base_url=srv.base_url)
    res = sc.create_sampling_client(model_path=path).sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(res.sequences[0].tokens) == 2


# -- bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=0)
    return sc, tc


def good_datum(tokens=TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def assert_still_serving(client) -> None:
    sc, tc = client
    out = tc.forward_backward([good_datum()], "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])
    tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()


def test_unknown_base_model(client):
    sc, _ = client
    with pytest.raises(tinker.BadRequestError, match="unknown base model"):
        sc.create_lora_training_client(base_model="nobody/no-such-model", rank=4).result()
    assert_still_serving(client)


@pytest.mark.parametrize("datum, loss_fn, message", [
    (good_datum([1, 2, 10**6, 4]), "cross_entropy", "outside the vocabulary"),
    (good_datum([1] * 8300), "cross_entropy", "context length"),
    (types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                 loss_fn_inputs={"target_tokens": TOKENS, "weights": [1.0] * len(TOKENS)}), "cross_entropy", "target_tokens"),
    (good_datum(), "no_such_loss", "no_such_loss"),
    (types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                 loss_fn_inputs={"target_tokens": TOKENS[1:]}), "importance_sampling", "logprobs"),
])
def test_bad_training_input_is_a_user_error(client, datum, loss_fn, message):
    _, tc = client
    with pytest.raises(tinker.RequestFailedError) as info:
        tc.forward_backward([datum], loss_fn).result()
    assert info.value.category == types.RequestErrorCategory.User
    assert message in str(info.value)
    assert_still_serving(client)


def test_bad_sampling_input(client):
    sc, _ = client
    sampler = sc.create_sampling_client(base_model=BASE)
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary"):
        sampler.sample(types.ModelInput.from_ints([1, 99999999]), 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.RequestFailedError, match="context length"):
        sampler.sample(types.ModelInput.from_ints([1] * 8200), 1, types.SamplingParams(max_tokens=2)).result()
    # Sampling values are checked by the same code as the OpenAI door's; the failure names the
    # field in the SDK's words.
    with pytest.raises(tinker.RequestFailedError, match=r"sampling_params\.top_p"):
        sampler.sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=2, top_p=0.0)).result()
    with pytest.raises(tinker.RequestFailedError, match=r"sampling_params\.temperature"):
        sampler.sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=2, temperature=-1.0)).result()
    with pytest.raises(tinker.RequestFailedError, match="num_samples"):
        sampler.sample(types.ModelInput.from_ints(TOKENS), 129, types.SamplingParams(max_tokens=2)).result()
    ok = sampler.sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(ok.sequences[0].tokens) == 2


def test_malformed_protobuf(server, client):
    r = post(server, "/api/v1/forward_backward", b"\xff\xfe not a protobuf", proto=True)
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]
    assert_still_serving(client)


def test_unknown_model_and_sampler_ids(server, client):
    r = post(server, "/api/v1/optim_step", optim_body("sess-nope:train:0", 1))
    assert r.status_code == 404 and "sess-nope:train:0" in r.json()["detail"]
    r = post(server, "/api/v1/asample", {
        "num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS, "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 2}, "sampling_session_id": "sess-nope:sample:0", "seq_id": 0, "type": "sample",
    })
    assert r.status_code == 404 and "sess-nope:sample:0" in r.json()["detail"]
    r = post(server, "/api/v1/retrieve_future", {"request_id": "req-never", "allow_metadata_only": False})
    assert r.json()["error"] and r.json()["category"]
    assert_still_serving(client)


def test_checkpoint_name_with_slash(client):
    _, tc = client
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        tc.save_state("a/b").result()
    assert_still_serving(client)


def test_tinker_path_that_does_not_exist(client):
    sc, _ = client
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        sc.create_sampling_client(model_path="tinker://sess-x:train:0/sampler_weights/none").sample(
            types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=1)).result()
    with pytest.raises((tinker.NotFoundError, tinker.RequestFailedError)):
        sc.create_training_client_from_state("tinker://sess-x:train:0/weights/none").get_info()
    assert_still_serving(client)


def test_api_keys(server, client):
    with pytest.raises(tinker.TinkerError, match="tml-"):
        tinker.ServiceClient(base_url=server.base_url, api_key="abc").create_lora_training_client(base_model=BASE).result()
    r = httpx.post(server.base_url + "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    r = post(server, "/api/v1/create_session", {"tags": [], "user_metadata": {}}, headers={"X-API-Key": "sk-wrong"})
    assert r.status_code == 401
    assert_still_serving(client)


def test_invalid_json_fields(server, client):
    r = post(server, "/api/v1/optim_step", {"model_id": 5, "adam_params": "fast"})
    assert r.status_code == 400 and "OptimStepRequest" in r.json()["detail"]
    r = httpx.post(server.base_url + "/api/v1/create_session", content=b"{not json", headers=HEADERS)
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert_still_serving(client)
