"""Shared test fixtures: the imported default model, and real tinkerd server processes.

Integration tests start `tinkerd serve` as a subprocess on a free loopback port and drive
it with the unmodified `tinker` / `openai` SDKs. Servers are stopped by their PID.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tinkerd_testing import CACHE, MODEL_NAME, Server


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model imported once (GGUF → HF directory), shared by every server."""
    from tinkerd.model_store import resolve_model, seed_hf_cache

    source = resolve_model(MODEL_NAME, CACHE)
    seed_hf_cache(source)
    return source.path


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tinkerd shared by the tests that do not need a server of their own."""
    srv = Server(model_dir, tmp_path_factory.mktemp("shared") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(model_dir: Path, tmp_path: Path):
    """Factory for a private server: start_server(extra_args=[...], data_dir=...)."""
    started: list[Server] = []

    def _start(extra_args: list[str] | None = None, data_dir: Path | None = None, port: int | None = None) -> Server:
        srv = Server(model_dir, data_dir or tmp_path / "data", extra_args, port=port).start()
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        srv.stop()


@pytest.fixture
def service_client(server: Server):
    import tinker

    client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-test")
    yield client


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
