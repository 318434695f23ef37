"""`tinkerd serve --ray`: the engines of two base models as Ray actors on a local cluster.

The fixture starts the cluster itself (`ray.init` with 2 CPUs, token authentication on,
the token in a file of this test's own) and a tinkerd that joins it with the same token,
serving the default model and a tiny random Llama 3 model. The unmodified SDKs drive it:
both models train at once and sample, the OpenAI routes serve checkpoints of both, the
same seeds give the same tokens as an in-process tinkerd, and a killed actor fails its
request cleanly, comes back, and tells a run that lost its state how to resume. Last, one
model served as two replicas shows where the router sends runs, checkpoints and base samples.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import tinker
from openai import OpenAI
from tinker import types

import tiny_models
from tinkerd_testing import MODEL_NAME, Server

ray = pytest.importorskip("ray")

TINY = "tinkerd-tests/tiny-llama3-ray"
TEXTS = ["Q: What is the capital of France?\nA: Paris.", "The quick brown fox jumps over the lazy dog because"]
PROMPT = "Q: Name a colour.\nA:"


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster of 2 CPUs with token authentication, its token in a private file
    (the environment tinkerd gets names it, as it would for any Ray client)."""
    token_file = tmp_path_factory.mktemp("ray") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    saved = {name: os.environ.pop(name, None) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # A new local cluster turns token authentication on (and sets RAY_AUTH_MODE=token here,
    # which the server's environment inherits with the token file's path).
    ray.init(num_cpus=2, include_dashboard=False, namespace="tinkerd", logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.pop("RAY_AUTH_MODE", None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def tiny_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_model("llama3", tmp_path_factory.mktemp("tiny") / "llama3", model_dir)


@pytest.fixture(scope="module")
def ray_server(ray_cluster: str, model_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(model_dir, tmp_path_factory.mktemp("ray-server") / "data",
                 ["--ray", ray_cluster, "--model", f"{TINY}={tiny_dir}"], model_name=MODEL_NAME).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_server(model_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same two models with the engines in the server's own process: the reference."""
    srv = Server(model_dir, tmp_path_factory.mktemp("local-server") / "data", ["--model", f"{TINY}={tiny_dir}"],
                 model_name=MODEL_NAME).start()
    yield srv
    srv.stop()


def actor(base_model: str):
    return ray.get_actor(f"{base_model}#0", namespace="tinkerd")


def actor_process(base_model: str) -> dict:
    return ray.get(actor(base_model).process.remote())


def train_and_save(sc: tinker.ServiceClient, base_model: str) -> dict:
    """Two steps of SFT on `base_model`, then a sampler checkpoint; the requests of both
    steps are sent before any result is awaited, as the SDK's users pipeline them."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=4, seed=11).result()
    tokenizer = tc.get_tokenizer()
    data = [sft_datum(tokenizer, t) for t in TEXTS]
    futures = []
    for _ in range(2):
        futures.append(tc.forward_backward(data, "cross_entropy"))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-2)))
    losses = [f.result().metrics["loss:sum"] for f in futures[::2]]
    return {"tc": tc, "tokenizer": tokenizer, "losses": losses, "path": tc.save_weights_for_sampler("final").result().path}


def train_both_at_once(server: Server) -> dict[str, dict]:
    sc = tinker.ServiceClient(base_url=server.base_url)
    runs: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda m=m: runs.__setitem__(m, train_and_save(sc, m))) for m in (MODEL_NAME, TINY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(runs) == {MODEL_NAME, TINY}
    runs["sc"] = sc  # type: ignore[assignment]
    return runs


def sampled(sc: tinker.ServiceClient, tokenizer, **target) -> list[list[int]]:
    client = sc.create_sampling_client(**target).result()
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    result = client.sample(types.ModelInput.from_ints(tokenizer.encode(PROMPT)), 2, params).result()
    return [list(s.tokens) for s in result.sequences]


@pytest.fixture(scope="module")
def ray_runs(ray_server: Server) -> dict:
    return train_both_at_once(ray_server)


def test_the_engines_are_ray_actors_and_the_api_process_loads_no_torch(ray_server: Server, ray_runs: dict):
    for base_model in (MODEL_NAME, TINY):
        process = actor_process(base_model)
        assert process["pid"] != ray_server.proc.pid
        # Two models on a 2-CPU cluster: one CPU each, and the engine uses it, at the
        # priority of any other process (Ray's workers start at niceness 15).
        assert process["engine_threads"] == 1 and process["niceness"] == 0
    maps = Path(f"/proc/{ray_server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps  # trained and sampled both models, and never loaded torch


def test_the_sdk_trains_both_models_at_once_and_samples_both(ray_runs: dict):
    sc = ray_runs["sc"]
    for base_model in (MODEL_NAME, TINY):
        run = ray_runs[base_model]
        assert run["losses"][1] < run["losses"][0], base_model
        for target in ({"base_model": base_model}, {"model_path": run["path"]}):
            samples = sampled(sc, run["tokenizer"], **target)
            assert len(samples) == 2 and all(len(s) == 8 for s in samples)


def test_the_openai_routes_serve_checkpoints_of_both_models_streamed_or_not(ray_server: Server, ray_runs: dict):
    client = OpenAI(base_url=ray_server.base_url + "/v1", api_key="tml-test")
    for base_model in (MODEL_NAME, TINY):
        path = ray_runs[base_model]["path"]
        whole = client.completions.create(model=path, prompt=PROMPT, max_tokens=6, temperature=0)
        streamed = "".join(chunk.choices[0].text for chunk in
                           client.completions.create(model=path, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
                           if chunk.choices)
        assert whole.usage.completion_tokens == 6
        assert streamed == whole.choices[0].text, base_model


def test_the_same_seed_gives_the_same_tokens_as_in_process(ray_runs: dict, local_server: Server):
    local = train_both_at_once(local_server)
    for base_model in (MODEL_NAME, TINY):
        on_ray, in_process = ray_runs[base_model], local[base_model]
        assert on_ray["losses"] == pytest.approx(in_process["losses"], rel=1e-4)
        tokenizer = on_ray["tokenizer"]
        assert sampled(ray_runs["sc"], tokenizer, base_model=base_model) == sampled(local["sc"], tokenizer, base_model=base_model)
        assert sampled(ray_runs["sc"], tokenizer, model_path=on_ray["path"]) == \
            sampled(local["sc"], tokenizer, model_path=in_process["path"])


def test_the_session_trace_splits_each_request_into_queue_wait_and_engine_work(ray_server: Server, ray_runs: dict):
    """The engine's start stamp crosses the actor boundary as a duration, so a session's
    trace shows the same split as with an in-process engine."""
    session_id = ray_runs[MODEL_NAME]["tc"].get_info().model_id.split(":train:")[0]
    headers = {"X-API-Key": "tml-test"}
    answer = httpx.get(f"{ray_server.base_url}/api/v1/sessions/{session_id}/trace_export", headers=headers).json()
    trace = httpx.get(answer["url"]).json()
    engine_work = [e for e in trace["traceEvents"] if e.get("cat") == "request" and e["name"] in ("forward_backward", "optim_step", "save")]
    assert len(engine_work) >= 2 * 5  # both runs: 2 forward_backward, 2 optim_step and a save each
    for request in engine_work:
        args = request["args"]
        assert "queue_wait_us" in args and "compute_us" in args, request
        assert args["compute_us"] > 0 and args["queue_wait_us"] + args["compute_us"] <= request["dur"], request


def test_an_in_flight_client_follows_its_run_across_the_actor_boundary(ray_runs: dict):
    """In-flight weights live in the actor that trains the run: a client made before a
    training step samples the step's weights once an in-flight save published them."""
    run = ray_runs[TINY]
    tc, tokens = run["tc"], run["tokenizer"].encode(TEXTS[0])
    live = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    before = live.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    tc.forward_backward([sft_datum(run["tokenizer"], TEXTS[0])], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    tc.save_weights_and_get_sampling_client(kind="inflight").result()
    now = tc.save_weights_and_get_sampling_client().result().compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    after = live.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert after[1:] == pytest.approx(now[1:], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(after[1:], before[1:], strict=True)) > 1e-3


def test_a_killed_actor_fails_its_request_cleanly_and_comes_back(ray_server: Server, ray_runs: dict):
    sc = ray_runs["sc"]
    run = ray_runs[MODEL_NAME]
    tc, tokenizer = run["tc"], run["tokenizer"]
    saved = tc.save_state("before-the-crash").result().path
    victim = actor_process(MODEL_NAME)["pid"]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 400, "temperature": 1.0, "seed": 3, "stream": True}
    events = []
    with httpx.stream("POST", ray_server.base_url + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer tml-test"}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 1:  # the request is decoding in the actor: kill its process
                os.kill(victim, signal.SIGKILL)
    error = events[-1].get("error")
    assert error is not None, events[-1]
    assert MODEL_NAME in error["message"] and "died" in error["message"], error
    assert len(events) < 400

    # Ray restarts the actor; the next request waits for it and succeeds.
    assert len(sampled(sc, tokenizer, base_model=MODEL_NAME)[0]) == 8
    assert actor_process(MODEL_NAME)["pid"] != victim
    # The run's in-memory state died with the process: it says so, and resumes from its save.
    data = [sft_datum(tokenizer, t) for t in TEXTS]
    with pytest.raises(Exception, match="state of .* was lost.*create_training_client_from_state"):
        tc.forward_backward(data, "cross_entropy").result()
    resumed = sc.create_training_client_from_state(saved).result()
    assert resumed.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # The other model's actor never noticed.
    assert len(sampled(sc, ray_runs[TINY]["tokenizer"], model_path=ray_runs[TINY]["path"])) == 2


def test_two_replicas_of_one_model_keep_runs_checkpoints_and_base_samples_where_they_belong(
        ray_cluster: str, ray_server: Server, tiny_dir: Path, tmp_path: Path):
    """`--replicas 2` with real actors: each run trains on the replica that holds its state,
    a checkpoint is sampled on one replica however many clients ask, and a base-model sample
    goes to the replica with nothing in flight."""
    ray_server.stop()  # its two actors hold the cluster's 2 CPUs (and the tiny model's actor name)
    srv = Server(tiny_dir, tmp_path / "data", ["--ray", ray_cluster, "--replicas", "2"], model_name=TINY).start()
    try:
        replicas = [ray.get_actor(f"{TINY}#{index}", namespace="tinkerd") for index in range(2)]

        def counter(name: str) -> list[int]:
            return [ray.get(replica.stats.remote()).counters.get(name, 0) for replica in replicas]

        def grew(before: list[int], after: list[int]) -> list[bool]:
            return [b > a for a, b in zip(before, after, strict=True)]

        sc = tinker.ServiceClient(base_url=srv.base_url)
        runs = [sc.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result() for seed in (1, 2)]
        tokenizer = runs[0].get_tokenizer()
        data = [sft_datum(tokenizer, t) for t in TEXTS]
        assert [ray.get(replica.stats.remote()).adapters_trainable for replica in replicas] == [1, 1]
        # The other replica has no state of the run: a step routed there would fail.
        for run in runs:
            before = counter("train_tokens")
            run.forward_backward(data, "cross_entropy").result()
            run.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            assert sum(grew(before, counter("train_tokens"))) == 1
        # One checkpoint, three requests from two clients: all decoded by the same replica.
        path = runs[0].save_weights_for_sampler("replicated").result().path
        prompt = types.ModelInput.from_ints(tokenizer.encode(PROMPT))
        params = types.SamplingParams(max_tokens=4, temperature=0.0)
        clients = [sc.create_sampling_client(model_path=path).result() for _ in range(2)]
        before = counter("decode_tokens")
        for client in (clients[0], clients[1], clients[0]):
            assert len(client.sample(prompt, 1, params).result().sequences[0].tokens) == 4
        assert sum(grew(before, counter("decode_tokens"))) == 1
        # A base-model sample while another decodes on one replica goes to the other.
        before = counter("decode_tokens")
        # The first asks for all the tiny model's context (512) allows: long in flight.
        body = {"model": TINY, "prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 3, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer tml-test"}, timeout=120) as response:
            assert response.status_code == 200, response.read()
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection, which cancels
            next(line for line in lines if line.startswith("data: "))  # decoding now
            second = httpx.post(srv.base_url + "/v1/completions", headers={"Authorization": "Bearer tml-test"},
                                json={"model": TINY, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}, timeout=120)
            assert second.status_code == 200, second.text
        after = counter("decode_tokens")
        assert grew(before, after) == [True, True], (before, after)
    finally:
        srv.stop()


def test_serve_refuses_replica_options_without_ray(model_dir: Path, tmp_path: Path):
    import subprocess
    import sys

    from tinkerd_testing import REPO, free_port

    proc = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
         "--model", str(model_dir), "--replicas", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "give --ray too" in proc.stderr
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
         "--model", str(model_dir), "--ray", "127.0.0.1:1"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "cannot join the Ray cluster at 127.0.0.1:1" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 90
