"""In-flight sampling clients (`save_weights_and_get_sampling_client(kind="inflight")`) through
the unmodified SDK: every in-flight client of a training run samples the weights of its
latest in-flight save, the client made before training included."""

from __future__ import annotations

import time

import httpx
import numpy as np
import tinker
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET = "The password is: zebra umbrella quantum pickle"


def sft_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def train(tc, data: list[types.Datum], steps: int) -> None:
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def scores(sampler, tokens: list[int]) -> np.ndarray:
    return np.array(sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:])


def save_named_inflight(server, model_id: str, name: str) -> str:
    """A named sampler save of kind "inflight" (the SDK sends names as snapshots): raw HTTP."""
    headers = {"X-API-Key": "tml-test"}
    body = {"model_id": model_id, "path": name, "kind": "inflight", "type": "save_weights_for_sampler"}
    r = httpx.post(server.base_url + "/api/v1/save_weights_for_sampler", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while time.time() < deadline:
        done = httpx.post(server.base_url + "/api/v1/retrieve_future", headers=headers, timeout=60,
                          json={"request_id": r.json()["request_id"], "allow_metadata_only": False}).json()
        if done.get("type") != "try_again":
            return done["path"]
    raise TimeoutError(name)


def test_an_in_flight_client_made_before_training_samples_each_later_in_flight_save(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=11).result()
    tokens = tokenizer.encode(TARGET)
    data = [sft_datum(tokens)]

    live = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    first = scores(live, tokens)
    train(tc, data, 2)
    # Trained, not published: the in-flight client still runs on the first save's weights.
    np.testing.assert_allclose(scores(live, tokens), first, atol=1e-4)

    newer = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()  # the same weights, fixed
    trained = scores(snapshot, tokens)
    assert trained[4:].mean() > first[4:].mean() + 2.0  # the run learnt the sequence
    # The very same client object now runs on the new weights, as does the newer client:
    # its prompt scores and its samples' logprobs are the snapshot's.
    np.testing.assert_allclose(scores(live, tokens), trained, atol=1e-4)
    np.testing.assert_allclose(scores(newer, tokens), trained, atol=1e-4)
    prompt = tokens[:5]
    sampled = live.sample(types.ModelInput.from_ints(prompt), 1,
                          types.SamplingParams(max_tokens=3, temperature=0.0, seed=1)).result().sequences[0]
    np.testing.assert_allclose(sampled.logprobs, scores(snapshot, prompt + list(sampled.tokens))[-3:], atol=1e-3)

    # A named in-flight save is a listed checkpoint and the in-flight clients' new weights.
    train(tc, data, 1)
    path = save_named_inflight(server, tc.model_id, "named-live")
    assert path.endswith("/sampler_weights/named-live")
    named = scores(sc.create_sampling_client(model_path=path).result(), tokens)
    assert np.max(np.abs(named - trained)) > 1e-3
    np.testing.assert_allclose(scores(live, tokens), named, atol=1e-4)
    refused = httpx.post(server.base_url + "/api/v1/save_weights_for_sampler", headers={"X-API-Key": "tml-test"}, timeout=60,
                         json={"model_id": tc.model_id, "path": "x", "kind": "live", "type": "save_weights_for_sampler"})
    assert refused.status_code == 400 and "kind" in refused.text
