"""The cap on one user's work in progress (`--max-queued-per-user`): past it a request is
refused for now (429 with Retry-After and a JSON error), the unmodified SDKs send it again
and every call still completes in order, and another user is not held back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import openai
import tinker
from prometheus_client.parser import text_string_to_metric_families
from test_cross_user import create_key
from tinker import types

from tinkerd_testing import MODEL_NAME

CAP = 2


def refusals(base_url: str) -> dict[str, float]:
    """429 answers so far, by route template."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {
        sample.labels["route"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tinkerd_http_requests_total" and sample.labels.get("status") == "429"
    }


def pending_futures(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "tinkerd_futures_pending")


def wait_for(condition, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def completion(base_url: str, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(base_url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                      json={"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": max_tokens,
                            "temperature": 0})


def test_a_user_past_the_cap_is_told_to_retry_and_the_sdks_do(start_server, tmp_path: Path):
    data_dir = tmp_path / "data"
    alice, bob = create_key(data_dir, "alice"), create_key(data_dir, "bob")
    srv = start_server(["--max-queued-per-user", str(CAP)], data_dir=data_dir)

    # Training: four forward_backward calls queued at once, then an optim_step. Each one past the
    # cap is refused for now and sent again with the same seq_id; all of them run, in order.
    service = tinker.ServiceClient(base_url=srv.base_url, api_key=alice)
    trainer = service.create_lora_training_client(base_model=MODEL_NAME, rank=4).result()
    tokens = np.random.default_rng(0).integers(100, 2000, size=33).tolist()
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 32})
    calls = [trainer.forward_backward([datum], "cross_entropy") for _ in range(4)]
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-3))
    losses = [call.result().metrics["loss:sum"] for call in calls]
    step.result()
    assert len(set(np.round(losses, 4))) == 1  # the same datum, the same weights: no step ran between them
    after = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after < losses[0]  # the step came after all four, and trained
    assert refusals(srv.base_url).get("/api/v1/forward_backward", 0) > 0

    # Sampling: four sample calls at once through one SamplingClient; all complete.
    sampler = service.create_sampling_client(base_model=MODEL_NAME)
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    prompt = types.ModelInput.from_ints(tokens[:8])
    samples = [sampler.sample(prompt, 1, params) for _ in range(4)]
    outputs = {tuple(s.result().sequences[0].tokens) for s in samples}
    assert len(outputs) == 1  # greedy: the same tokens every time
    assert refusals(srv.base_url).get("/api/v1/asample", 0) > 0

    # OpenAI: with two long samples of alice's in progress, her completion is refused with a
    # JSON error and Retry-After; bob's goes through; hers does too once hers are done.
    long = types.SamplingParams(max_tokens=400, temperature=0.0, stop=[])  # stop=[]: not even at EOS
    running = [sampler.sample(prompt, 1, long) for _ in range(CAP)]
    assert wait_for(lambda: pending_futures(srv.base_url) >= CAP and not any(r.done() for r in running))
    refused = completion(srv.base_url, alice, 4)
    other = completion(srv.base_url, bob, 4)
    assert not any(r.done() for r in running)  # still in progress while those were answered
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "alice" in error["message"] and "--max-queued-per-user" in error["message"]
    assert other.status_code == 200 and other.json()["choices"][0]["text"]
    for r in running:
        assert len(r.result().sequences[0].tokens) == 400
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=alice, max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0).choices[0].text
