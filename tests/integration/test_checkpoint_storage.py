"""Checkpoint storage in use, through the unmodified SDK (AdminClient) and the `tinker billing
checkpoint-storage` CLI: real byte counts from the checkpoints table, per project and owner,
only what the caller may read, and no prices.

alice and bob are in project `lab`; carol is not.
"""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
import tinker
from test_cross_user import TINKER_CLI, create_key, tinkerd

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("storage") / "data"
    data_dir.mkdir(parents=True)
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob", "carol")}
    made = tinkerd("projects", "create", "lab", "--member", "alice", "--member", "bob", "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    srv = Server(model_dir, data_dir).start()
    try:
        shared = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"], project_id="lab")
        in_lab = shared.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=1)
        in_lab.save_state("a").result()
        in_lab.save_weights_for_sampler("b").result()
        private = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"]).create_lora_training_client(
            base_model=MODEL_NAME, rank=2, seed=2)
        private.save_state("c").result()
        yield srv, keys
    finally:
        srv.stop()


def sizes(srv: Server, key: str) -> dict[str | None, int]:
    """Bytes of every checkpoint the key's user owns, by project, as the checkpoint list reports them."""
    rest = tinker.ServiceClient(base_url=srv.base_url, api_key=key).create_rest_client()
    in_lab = {r.training_run_id for r in rest.list_training_runs(project_id="lab").result().training_runs}
    out: dict[str | None, int] = {}
    for c in rest.list_user_checkpoints().result().checkpoints:
        project = "lab" if c.tinker_path.removeprefix("tinker://").split("/")[0] in in_lab else None
        out[project] = out.get(project, 0) + c.size_bytes
    return out


def test_usage_is_real_bytes_per_project_and_owner(lab):
    srv, keys = lab
    admin = tinker.AdminClient(base_url=srv.base_url, api_key=keys["alice"])
    usage = admin.get_current_checkpoint_storage_usage().result()
    rows = {(row.project_id, row.user_name): row for row in usage.data}
    expected = sizes(srv, keys["alice"])
    assert set(rows) == {("lab", "alice"), (None, "alice")}
    assert rows[("lab", "alice")].checkpoint_count == 2 and rows[(None, "alice")].checkpoint_count == 1
    assert rows[("lab", "alice")].size_bytes == expected["lab"] > 0
    assert rows[(None, "alice")].size_bytes == expected[None] > 0
    assert rows[("lab", "alice")].size_gigabytes == pytest.approx(expected["lab"] / 1e9)
    assert usage.effective_rate_usd_per_gigabyte_month is None and rows[("lab", "alice")].estimated_monthly_cost_usd is None
    only_lab = admin.get_current_checkpoint_storage_usage(project_id="lab").result()
    assert [(r.project_id, r.user_name) for r in only_lab.data] == [("lab", "alice")]


def test_other_users_see_only_what_they_may_read(lab, tmp_path):
    srv, keys = lab
    env = {**os.environ, "TINKER_API_KEY": keys["bob"], "TINKER_BASE_URL": srv.base_url, "HOME": str(tmp_path)}
    shown = subprocess.run([TINKER_CLI, "-f", "json", "billing", "checkpoint-storage"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["data"]  # bob sees the project's storage, not alice's private checkpoint
    assert [(r["project_id"], r["user_name"], r["checkpoint_count"]) for r in rows] == [("lab", "alice", 2)]

    carol = tinker.AdminClient(base_url=srv.base_url, api_key=keys["carol"])
    assert carol.get_current_checkpoint_storage_usage().result().data == []
    refused = httpx.get(srv.base_url + "/api/v1/billing/usage/checkpoints/current", params={"project_id": "lab"},
                        headers={"X-API-Key": keys["carol"]}, timeout=30)
    assert refused.status_code == 404 and "lab" in refused.json()["detail"]
