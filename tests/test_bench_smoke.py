"""The benchmark suite at smoke sizes: the CI-sized version of `make bench`.

It proves every benchmark still runs end to end against a real server (and that its
baselines still load); the figures at these sizes mean nothing and are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench.run import BENCHMARKS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_smoke_runs_every_benchmark_and_writes_json(tmp_path: Path):
    out = tmp_path / "bench-smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1700,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert set(result["benchmarks"]) == set(BENCHMARKS)  # every registered benchmark ran
    for name, bench in result["benchmarks"].items():
        assert not bench.get("error"), (name, bench.get("error"))
    assert all(r["value"] is not None for b in result["benchmarks"].values() for r in b["rows"])
    assert result["benchmarks"]["scaling"]["tables"]
    assert result["machine"]["cpu_model"] and result["machine"]["torch"]
    assert "train fwd_bwd + optim_step" in proc.stdout  # the summary table
