"""The test suite's process helper: `tinkerd serve` as a subprocess on a free loopback port.

A plain module (not a conftest) so tests, the acceptance tier and the benchmarks all import
the same `Server` by name. Importing it points HF_HOME at the suite's private cache and
turns off every hub lookup and telemetry, exactly as the tests expect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TINKERD_TEST_CACHE", REPO / ".data" / "test-cache"))
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Clients load the tokenizer by hub id: point them (and the servers) at a private HF cache
# that the server seeds, and never touch the network.
os.environ["HF_HOME"] = str(CACHE / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TINKER_TELEMETRY"] = "0"
os.environ.setdefault("TINKER_API_KEY", "tml-test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, data_dir: Path, extra_args: list[str] | None = None, port: int | None = None,
                 model_name: str | None = None):
        self.model_dir = model_dir
        self.model_name = model_name  # served as `--model NAME=DIR`; None: the directory's own name
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"server-{data_dir.name}-{self.port}.log"

    @property
    def model_arg(self) -> str:
        return f"{self.model_name}={self.model_dir}" if self.model_name else str(self.model_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "tinkerd.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--model", self.model_arg, "--log-level", "warning",
            *self.extra_args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinkerd exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/api/v1/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tinkerd did not start in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self._log.close()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def close_sdk_clients(timeout: float = 10.0) -> None:
    """Close every `tinker` client still open in this process and stop the SDK's event loop.

    The SDK runs one event loop in a daemon thread, and each client keeps a heartbeat task on
    it. Tests leave clients open when their server stops, so at the end of a run those
    heartbeats still fail against dead ports, logging after pytest's summary. A daemon thread
    still working while Python 3.11 tears down the interpreter can abort the process (SIGABRT)
    and turn a passing run into a failed one; ending the loop before exit leaves nothing running.
    """
    import asyncio
    import gc

    try:
        from tinker.lib import internal_client_holder as sdk
    except ImportError:
        return
    singleton = getattr(sdk, "_internal_client_holder_thread_singleton", None)
    loop = getattr(singleton, "_loop", None)
    thread = getattr(singleton, "_thread", None)
    if loop is None or thread is None or not thread.is_alive():
        return

    async def close_all() -> None:
        for holder in [o for o in gc.get_objects() if type(o) is sdk.InternalClientHolder]:
            try:
                await holder.aclose()
            except Exception:  # a client of a server long gone: closing is all that is left to do
                pass
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
