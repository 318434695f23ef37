"""A genuine internal error (a bug, a failing disk) answers a JSON 500 in the door's error shape,
and the connection it came on stays open for the client's next request.

No input is known to cause one, so the failure is injected: the real app, in this process,
served by uvicorn on a loopback port, with one core method replaced by one that raises.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from tinkerd.api.app import create_app
from tinkerd.core.service import Service
from tinkerd_testing import free_port

HEADERS = {"X-API-Key": "tml-test"}


class Broken(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise Broken("the disk is on fire")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Service]]:
    """The app with no models (nothing here samples), served on a free loopback port."""
    service = Service(tmp_path / "data", {})
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=free_port(), log_level="critical"))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            thread.join(0.02)
        yield f"http://127.0.0.1:{server.config.port}", service
    finally:
        server.should_exit = True
        thread.join(20)


def _local_port(response: httpx.Response) -> int:
    """The client-side port of the connection a response came on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("method, path, body, broken, read_error", [
    ("GET", "/api/v1/training_runs", None, "registry.list_runs", lambda r: r.json()["detail"]),
    ("POST", "/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}, "create_session", lambda r: r.json()["detail"]),
    ("GET", "/v1/models", None, "readable_checkpoints", lambda r: r.json()["error"]["message"]),
])
def test_an_internal_error_is_a_json_500_and_the_connection_stays_open(served, monkeypatch, method, path, body, broken,
                                                                       read_error):
    base_url, service = served
    owner, _, name = broken.rpartition(".")
    monkeypatch.setattr(getattr(service, owner) if owner else service, name, _raise)
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=30, limits=httpx.Limits(max_connections=1)) as client:
        failed = client.request(method, path, json=body)
        assert failed.status_code == 500, failed.text
        assert failed.headers["content-type"] == "application/json"
        assert "internal server error (Broken)" in read_error(failed)
        assert "on fire" not in failed.text  # the details are the server's log's, not the client's
        assert failed.headers.get("connection", "").lower() != "close"
        monkeypatch.undo()
        after = client.request(method, path, json=body)
        assert after.status_code == 200, after.text
        assert _local_port(after) == _local_port(failed), "the 500 closed the connection"


def test_an_openai_500_has_openai_s_server_error_type_and_is_counted(served, monkeypatch):
    base_url, service = served
    monkeypatch.setattr(service, "readable_checkpoints", _raise)
    r = httpx.get(base_url + "/oai/api/v1/models", headers=HEADERS, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    metrics = httpx.get(base_url + "/metrics", timeout=30).text
    assert 'tinkerd_http_requests_total{method="GET",route="/oai/api/v1/models",status="500"} 1.0' in metrics
