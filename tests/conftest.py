"""Shared test fixtures: the imported default model, real tinkerd server processes, and the
databases metadata can live in.

Integration tests start `tinkerd serve` as a subprocess on a free loopback port and drive
it with the unmodified `tinker` / `openai` SDKs. Servers are stopped by their PID. Database
tests run on SQLite and on a real PostgreSQL that the suite starts itself (tests/postgres.py).
"""

from __future__ import annotations

import atexit
from pathlib import Path

import pytest

from postgres import PostgresServer, find_bin_dir
from tinkerd_testing import CACHE, MODEL_NAME, Server, close_sdk_clients


def pytest_unconfigure(config: pytest.Config) -> None:
    close_sdk_clients()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the whole run (started on first use, ~2 s); skips the tests
    that need it where PostgreSQL is not installed."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb and pg_ctl on PATH, in /usr/local/bin or "
                    "/usr/lib/postgresql/*/bin): the Postgres variants of the database tests cannot run")
    server = PostgresServer(bin_dir)
    atexit.register(server.stop)  # also when the run ends without reaching the teardown
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty database, once as the data dir's SQLite file and once as a fresh database on
    the suite's PostgreSQL server (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tinkerd.sqlite'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    yield url
    server.drop_database(url)


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
