"""What the web console reads from the server, checked without a browser: the console's
files and their Content-Security-Policy, the server status route, the incremental metrics
route and the runs list's extension fields and filters."""

from __future__ import annotations

import httpx
import pytest
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = {"X-API-Key": "tml-test"}


@pytest.fixture(scope="module")
def trained(server, tokenizer):
    import tinker

    client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-test").create_lora_training_client(base_model=BASE, rank=4)
    ids = tokenizer.encode("A console shows loss curves.")
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})

    def step() -> float:
        loss = client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        return loss

    losses = [step(), step()]
    return client, client.get_info().model_id, step, losses


def test_the_console_is_served_without_a_key_under_a_self_only_policy(server):
    root = httpx.get(server.base_url + "/")
    assert root.status_code == 307 and root.headers["location"] == "/console/"
    for path in ("/console/", "/console/app.js", "/console/vendor/uPlot.esm.js"):
        response = httpx.get(server.base_url + path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == "default-src 'self'"
    assert "http" not in httpx.get(server.base_url + "/console/").text  # nothing from another origin
    assert httpx.get(server.base_url + "/api/v1/server_status").status_code == 401  # the data still needs a key


def test_server_status_describes_each_engine_and_the_data_dir(server):
    status = httpx.get(server.base_url + "/api/v1/server_status", headers=KEY).json()
    (engine,) = status["engines"]
    assert engine["base_model"] == BASE and engine["device"] == "cpu" and engine["dtype"] == "float32"
    assert engine["queued_jobs"] >= 0 and engine["sample_rows_running"] >= 0 and engine["memory_bytes"] > 0
    assert status["disk"]["data_dir_bytes"] > 0 and status["disk"]["free_bytes"] > 0
    assert status["uptime_seconds"] >= 0 and status["version"]


def test_metrics_after_id_returns_only_new_points(server, trained):
    _, run_id, step, _ = trained
    url = f"{server.base_url}/api/v1/training_runs/{run_id}/metrics"
    everything = httpx.get(url, headers=KEY).json()
    assert [m["key"] for m in everything["metrics"]].count("loss:sum") >= 2
    assert everything["last_id"] == everything["metrics"][-1]["id"]
    nothing_new = httpx.get(url, params={"after_id": everything["last_id"]}, headers=KEY).json()
    assert nothing_new["metrics"] == [] and nothing_new["last_id"] == everything["last_id"]
    loss = step()
    news = httpx.get(url, params={"after_id": everything["last_id"]}, headers=KEY).json()["metrics"]
    assert [m["value"] for m in news if m["key"] == "loss:sum"] == [pytest.approx(loss)]
    assert {m["kind"] for m in news} == {"forward_backward", "optim_step"}


def test_runs_carry_progress_and_filter_by_model_and_text(server, trained):
    _, run_id, _, _ = trained
    runs = httpx.get(server.base_url + "/api/v1/training_runs", params={"search": run_id}, headers=KEY).json()
    (run,) = runs["training_runs"]
    steps = [m for m in httpx.get(f"{server.base_url}/api/v1/training_runs/{run_id}/metrics", headers=KEY).json()["metrics"]
             if m["kind"] == "optim_step"]
    assert run["steps"] == len({m["seq_id"] for m in steps}) and run["latest_loss"] > 0 and run["connected"] is True
    assert runs["cursor"]["total_count"] == 1
    other_model = httpx.get(server.base_url + "/api/v1/training_runs", params={"base_model": "no/such-model"}, headers=KEY).json()
    assert other_model["training_runs"] == [] and other_model["cursor"]["total_count"] == 0
    percent = httpx.get(server.base_url + "/api/v1/training_runs", params={"search": "%"}, headers=KEY).json()
    assert percent["training_runs"] == []  # a literal %, not a wildcard
