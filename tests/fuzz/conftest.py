"""The fuzz tier's one server, and the real ids its requests aim at now and then (a session,
a trained model, its checkpoints, a sampler), so a fuzzed body reaches past the id checks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fuzzing import BASE, HEADERS

from tinkerd_testing import Server


@pytest.fixture(scope="package")
def fuzz_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # A short long-poll: retrieving a fuzzed request that waits on an earlier seq_id answers at once.
    srv = Server(model_dir, tmp_path_factory.mktemp("fuzz") / "data", ["--long-poll-seconds", "0.2"]).start()
    yield srv
    srv.stop()


@dataclass
class World:
    session_id: str
    model_id: str
    sampler_id: str
    weights_path: str
    sampler_path: str

    @property
    def run_id(self) -> str:
        return self.model_id


def _post(server: Server, path: str, body: dict) -> dict:
    r = httpx.post(server.base_url + path, json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _result(server: Server, request_id: str) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        out = _post(server, "/api/v1/retrieve_future", {"request_id": request_id})
        if out.get("type") != "try_again":
            assert "error" not in out, out
            return out
    raise TimeoutError(request_id)


@pytest.fixture(scope="package")
def world(fuzz_server: Server) -> World:
    session = _post(fuzz_server, "/api/v1/create_session", {"tags": ["fuzz"], "user_metadata": {}, "sdk_version": "0.38.0"})
    session_id = session["session_id"]
    created = _post(fuzz_server, "/api/v1/create_model", {
        "session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 1}})
    _result(fuzz_server, created["request_id"])
    model_id = created["model_id"]
    weights = _result(fuzz_server, _post(fuzz_server, "/api/v1/save_weights",
                                         {"model_id": model_id, "path": "fuzz", "seq_id": 1})["request_id"])
    sampler = _result(fuzz_server, _post(fuzz_server, "/api/v1/save_weights_for_sampler",
                                         {"model_id": model_id, "path": "fuzz", "seq_id": 2})["request_id"])
    sampling = _post(fuzz_server, "/api/v1/create_sampling_session",
                     {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": BASE})
    return World(session_id, model_id, sampling["sampling_session_id"], weights["path"], sampler["path"])
