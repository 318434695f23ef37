"""The soak program at CI size: 45 seconds, six clients of two users, a `kill -9` and restart
of the server halfway (bench/soak.py has the full ten-minute, sixteen-client version).

What a user relies on: however the requests of two users interleave with training, saves,
deletes, TTLs, streams that hang up and a crash of the server, nothing fails that should
not, one user never reads the other's private checkpoints, and every checkpoint the server
acknowledged as saved loads afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_a_45_second_soak_with_a_kill9_has_no_unexpected_error_and_every_checkpoint_loads(tmp_path: Path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.75", "--clients", "6", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=840)
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert out.exists(), report
    result = json.loads(out.read_text())
    assert result["unexpected_errors"] == [], report
    assert result["checkpoint_failures"] == [], report
    assert result["server_alive_at_end"], report
    assert proc.returncode == 0, report
    # the run did what it is for: work on both sides of the restart, and checkpoints to check
    assert result["outage_s"] > 0 and result["killed_after_s"] >= 20
    for ops in (result["operations"], result["operations_after_restart"]):
        assert ops.get("train", 0) and ops.get("sample_sdk", 0) and ops.get("sample_openai", 0), ops
    assert result["checkpoints"]["loaded"] >= 1, result["checkpoints"]
