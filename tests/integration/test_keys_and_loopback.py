"""`tinkerd keys` against a data dir, also while a server runs on it, and the rule that a
server without keys (where any `tml-` key gets in) listens only on loopback unless told
otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tinkerd_testing import REPO, Server, free_port

REVOCATION_DEADLINE_S = 15.0  # the server remembers a key for 2 s; generous for a busy machine


def tinkerd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "tinkerd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def status_with(base_url: str, key: str) -> int:
    return httpx.get(base_url + "/api/v1/training_runs", headers={"X-API-Key": key}, timeout=30).status_code


def poll_until(condition, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_keys_create_list_revoke_offline(tmp_path: Path):
    data_dir = str(tmp_path / "data")
    alice = tinkerd("keys", "create", "--name", "alice", "--data-dir", data_dir)
    assert alice.returncode == 0 and alice.stdout.strip().startswith("tml-") and "only this once" in alice.stderr
    key = alice.stdout.strip()
    assert tinkerd("keys", "create", "--name", "root", "--admin", "--data-dir", data_dir).returncode == 0
    again = tinkerd("keys", "create", "--name", "alice", "--data-dir", data_dir)
    assert again.returncode == 1 and "already has a key" in again.stderr
    listing = tinkerd("keys", "list", "--data-dir", data_dir).stdout
    lines = listing.splitlines()
    assert lines[0].split() == ["NAME", "ADMIN", "CREATED", "LAST", "USED", "REVOKED"]
    assert lines[1].startswith("alice") and " no " in lines[1] and lines[2].startswith("root") and " yes " in lines[2]
    assert key not in listing and key[4:] not in listing
    assert tinkerd("keys", "revoke", "alice", "--data-dir", data_dir).returncode == 0
    assert tinkerd("keys", "revoke", "alice", "--data-dir", data_dir).returncode == 1  # nothing left to revoke
    assert tinkerd("keys", "list", "--data-dir", data_dir).stdout.splitlines()[1].rstrip()[-8:].count(":") == 2  # a time


def test_no_keys_on_a_network_address_refuses_to_start(tmp_path: Path):
    for host in ("0.0.0.0", "::"):
        proc = tinkerd("serve", "--host", host, "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), timeout=60)
        assert proc.returncode == 2
        assert "tinkerd keys create --name NAME" in proc.stderr and "--allow-any-key-on-network" in proc.stderr


def test_override_flag_then_keys_created_and_revoked_while_it_runs(model_dir, tmp_path: Path):
    """Started on 0.0.0.0 with the override, any tml- key gets in; once a key is created
    (offline, while it runs), only created keys do; a revoked one is refused within seconds."""
    data_dir = tmp_path / "data"
    srv = Server(model_dir, data_dir, ["--host", "0.0.0.0", "--allow-any-key-on-network"]).start()
    try:
        assert "WARNING: --allow-any-key-on-network" in srv.log_text()
        assert status_with(srv.base_url, "tml-anything") == 200
        created = tinkerd("keys", "create", "--name", "carol", "--data-dir", str(data_dir))
        key = created.stdout.strip()
        assert poll_until(lambda: status_with(srv.base_url, "tml-anything") == 401, REVOCATION_DEADLINE_S)
        assert status_with(srv.base_url, key) == 200
        carol = tinkerd("keys", "list", "--data-dir", str(data_dir)).stdout.splitlines()[1].split()
        assert carol[0] == "carol" and carol[4] != "-"  # LAST USED, written by the running server
        assert tinkerd("keys", "revoke", "carol", "--data-dir", str(data_dir)).returncode == 0
        assert poll_until(lambda: status_with(srv.base_url, key) == 401, REVOCATION_DEADLINE_S)
        refused = httpx.get(srv.base_url + "/api/v1/training_runs", headers={"X-API-Key": key}).json()
        assert "revoked" in refused["detail"]
        assert status_with(srv.base_url, "tml-anything") == 401  # revoking every key does not reopen the server
    finally:
        srv.stop()
