"""Acceptance tier: tinker-cookbook 0.6.1 recipes, unmodified, against a real tinkerd.

The cookbook runs in its own venv (cookbook_env.py), one subprocess per recipe (harness.py),
with a SmolLM2 shim on its PYTHONPATH (shim/), talking to one tinkerd process over loopback,
exactly as a user's recipe would. Run with `make test-cookbook`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cookbook_env import ensure_cookbook_venv  # noqa: E402
from harness import RESULTS_PATH, TIMINGS, Cookbook  # noqa: E402

from tinkerd_testing import Server  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TIMINGS:
        return
    terminalreporter.section("cookbook acceptance: seconds per step (metrics time/total)")
    for record in TIMINGS:
        terminalreporter.write_line(
            f"{record['scenario']:<34} exit={record['exit']} steps={record['steps']} wall={record['wall_s']}s "
            f"mean/step={record['mean_s_per_step']}s after-first={record['mean_s_per_step_after_first']}s "
            f"matmul-GFLOP/s={record['matmul_gflops_start_end']} (quiet box ~165)"
        )
    terminalreporter.write_line(f"written to {RESULTS_PATH}")


@pytest.fixture(scope="session")
def cookbook_python() -> Path:
    return ensure_cookbook_venv()


@pytest.fixture(scope="module")
def cookbook(request: pytest.FixtureRequest, cookbook_python: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tinkerd for the module's recipes, as one user's server would be."""
    root = tmp_path_factory.mktemp("cookbook")
    server = Server(model_dir, root / "tinkerd-data").start()
    runs = root / "runs"
    runs.mkdir()
    yield Cookbook(cookbook_python, server, runs, model_dir)
    server.stop()
