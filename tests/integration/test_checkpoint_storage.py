"""Checkpoint storage in use and the audit log of checkpoint events, through the unmodified SDK
(AdminClient) and the `tinker billing checkpoint-storage` CLI: real byte counts from the
checkpoints table, per project and owner, only what the caller may read, and no prices; each
create, publish, unpublish, delete and expiry logged once, seen by the users who may read it.

alice and bob are in project `lab`; carol is not.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time

import httpx
import pytest
import tinker
from test_cross_user import TINKER_CLI, keys_and_project

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("storage") / "data"
    keys = keys_and_project(data_dir, "lab")
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


def events(srv: Server, key: str, **params) -> list[tinker.types.AuditLogEntry]:
    return tinker.AdminClient(base_url=srv.base_url, api_key=key).get_audit_log(**params).result().entries


def test_the_audit_log_records_each_checkpoint_event(lab):
    srv, keys = lab
    alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
    rest = alice.create_rest_client()
    path = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=3).save_weights_for_sampler("logged").result().path
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()  # no change: no event
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    doomed = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=4).save_state("doomed").result().path
    rest.delete_checkpoint_from_tinker_path(doomed).result()
    expiring = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=5).save_state("brief").result().path
    rest.set_checkpoint_ttl_from_tinker_path(expiring, 1).result()

    deadline = time.time() + 120  # the janitor passes every few seconds
    while not any(e.event == "checkpoint_expire" for e in events(srv, keys["alice"])):
        assert time.time() < deadline, "the expired checkpoint was never logged"
        time.sleep(0.5)
    log = [(e.event, e.tinker_path) for e in events(srv, keys["alice"]) if e.tinker_path in (path, doomed, expiring)]
    assert log == [("checkpoint_create", path), ("checkpoint_publish", path), ("checkpoint_unpublish", path),
                   ("checkpoint_create", doomed), ("checkpoint_delete", doomed),
                   ("checkpoint_create", expiring), ("checkpoint_expire", expiring)]
    entry = next(e for e in events(srv, keys["alice"]) if e.event == "checkpoint_delete")
    assert entry.event_details["actor"] == "alice" and entry.event_details["owner"] == "alice"
    assert next(e for e in events(srv, keys["alice"]) if e.event == "checkpoint_expire").event_details["actor"] == "(system)"

    # bob sees the events of the project's checkpoints only; carol none; other days and kinds are empty
    assert {e.event_details["project_id"] for e in events(srv, keys["bob"])} == {"lab"}
    assert events(srv, keys["carol"]) == []
    assert events(srv, keys["alice"], day=dt.date(2020, 1, 1)) == []
    assert events(srv, keys["alice"], event_type="projects") == []
    bad = httpx.get(srv.base_url + "/api/v1/audit", params={"event_type": "everything"}, headers={"X-API-Key": keys["alice"]},
                    timeout=30)
    assert bad.status_code == 400 and "event_type" in bad.json()["detail"]
    bad_day = httpx.get(srv.base_url + "/api/v1/audit", params={"day": "monday"}, headers={"X-API-Key": keys["alice"]}, timeout=30)
    assert bad_day.status_code == 400 and "day" in bad_day.json()["detail"]
