"""`tinker session export-trace`: the unmodified CLI downloads a Chrome trace-event JSON file
of the session's requests (what Perfetto opens), with one slice per request, its seq_id and
sizes, and its time split into the wait in the engine's queue and the engine's work. Only
the session's owner may export it; the download URL itself needs no key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

import tiny_models
from tinkerd_testing import Server

TINKER_CLI = str(Path(sys.executable).with_name("tinker"))
TINY = "tiny-llama3"


def create_keys(data_dir: Path, *names: str) -> dict[str, str]:
    """As `tinkerd keys create --name NAME` does, in this process (two fewer interpreters to start)."""
    from tinkerd.core.db import default_database_url, open_database
    from tinkerd.core.keys import ApiKeys

    keys = ApiKeys(open_database(default_database_url(data_dir)))
    return {name: keys.create(name) for name in names}


def datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


@pytest.fixture(scope="module")
def traced(model_dir, tmp_path_factory, tokenizer):
    """alice's session on a tiny model: a training run (2 forward_backward, 2 optim_step, a
    save) and a sampler (2 sample requests), exported with the CLI."""
    tmp = tmp_path_factory.mktemp("trace-export")
    data_dir = tmp / "data"
    data_dir.mkdir()
    keys = create_keys(data_dir, "alice", "bob")
    srv = Server(tiny_models.save_model("llama3", tmp / "tiny", model_dir), data_dir, model_name=TINY).start()
    try:
        alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
        training = alice.create_lora_training_client(base_model=TINY, rank=2, seed=1)
        data = [datum(tokenizer, "Q: What is two plus two?\nA: Four."), datum(tokenizer, "The sky is blue.")]
        for _ in range(2):
            training.forward_backward(data, "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        path = training.save_weights_for_sampler("traced").result().path
        sampler = alice.create_sampling_client(model_path=path)
        prompt = tokenizer.encode("Hello")
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7)
        samples = [sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params) for _ in range(2)]
        for s in samples:
            s.result()
        model_id = training.get_info().model_id
        session_id = model_id.split(":train:")[0]
        out = tmp / "trace.json"
        env = {**os.environ, "TINKER_BASE_URL": srv.base_url, "TINKER_API_KEY": keys["alice"], "HF_HUB_OFFLINE": "1"}
        cli = subprocess.run([TINKER_CLI, "session", "export-trace", session_id, "--output", str(out)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        yield {"srv": srv, "keys": keys, "session_id": session_id, "model_id": model_id, "trace": json.loads(out.read_text()),
               "tokens": sum(len(d.model_input.to_ints()) for d in data), "prompt": prompt}
    finally:
        srv.stop()


def requests_of(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "request"]


def test_the_cli_downloads_a_chrome_trace_with_one_slice_per_request(traced):
    trace = traced["trace"]
    assert isinstance(trace["traceEvents"], list)
    for event in trace["traceEvents"]:
        assert event["ph"] in ("X", "M"), event
        if event["ph"] == "X":
            assert {"name", "ph", "ts", "dur", "pid", "tid"} <= event.keys(), event
            assert isinstance(event["ts"], int) and event["dur"] >= 0
    names = Counter(e["name"] for e in requests_of(trace))
    assert names == Counter({"create_model": 1, "forward_backward": 2, "optim_step": 2, "save": 1,
                             "create_sampling_session": 1, "sample": 2})
    assert trace["otherData"]["session_id"] == traced["session_id"]
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert traced["model_id"] in lanes and any(":sample:" in lane for lane in lanes)


def test_each_slice_names_its_seq_id_and_sizes(traced):
    by_name: dict[str, list[dict]] = {}
    for e in requests_of(traced["trace"]):
        by_name.setdefault(e["name"], []).append(e["args"])
    # The training client numbers its requests: creation 0, then one per request in order.
    assert [a["seq_id"] for a in by_name["create_model"]] == [0]
    assert sorted(a["seq_id"] for a in by_name["forward_backward"]) == [1, 3]
    assert sorted(a["seq_id"] for a in by_name["optim_step"]) == [2, 4]
    assert [a["seq_id"] for a in by_name["save"]] == [5]
    for args in by_name["forward_backward"]:
        assert args["datums"] == 2 and args["tokens"] == traced["tokens"] and args["lane"] == traced["model_id"]
    for args in by_name["sample"]:
        assert args["prompt_tokens"] == len(traced["prompt"]) and args["num_samples"] == 2 and args["max_tokens"] == 4
        assert 2 <= args["sampled_tokens"] <= 8


def test_queue_wait_and_compute_fit_in_each_request(traced):
    events = traced["trace"]["traceEvents"]
    for req in requests_of(traced["trace"]):
        args = req["args"]
        if req["name"] == "create_sampling_session":
            continue  # answered at once, not queued in the engine
        assert "queue_wait_us" in args and "compute_us" in args, req
        assert args["compute_us"] > 0
        assert args["queue_wait_us"] + args["compute_us"] <= req["dur"]
        # The wait and the work are drawn inside the request's slice, on its lane.
        phases = [e for e in events if e.get("cat") in ("queue", "compute") and e["tid"] == req["tid"]
                  and req["ts"] <= e["ts"] and e["ts"] + e["dur"] <= req["ts"] + req["dur"]]
        assert {"queued", "compute"} <= {e["name"] for e in phases}, req


def test_only_the_owner_may_export_and_the_url_needs_no_key(traced):
    srv, sid = traced["srv"], traced["session_id"]
    url = f"{srv.base_url}/api/v1/sessions/{sid}/trace_export"
    assert httpx.get(url, headers={"X-API-Key": traced["keys"]["bob"]}).status_code == 404
    assert httpx.get(f"{srv.base_url}/api/v1/sessions/sess-unknown/trace_export",
                     headers={"X-API-Key": traced["keys"]["alice"]}).status_code == 404
    answer = httpx.get(url, headers={"X-API-Key": traced["keys"]["alice"]}).json()
    assert answer["status"] == "ready"
    assert httpx.get(answer["url"]).json()["otherData"]["session_id"] == sid
    tampered = answer["url"][:-3] + ("AAA" if not answer["url"].endswith("AAA") else "BBB")
    assert httpx.get(tampered).status_code == 403
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=srv.base_url, api_key=traced["keys"]["bob"]).export_session_trace(sid).result()
