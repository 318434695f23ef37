"""Runs, checkpoints and sessions through the unmodified RestClient and the `tinker` CLI.

One private server (so counts and pages are exact) with three training runs: A has a
training and a sampler checkpoint, B a training checkpoint, C none.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import tinker
from safetensors.torch import load_file
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINKER_CLI = str(Path(sys.executable).with_name("tinker"))


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def tinker_cli(base_url: str, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": base_url, "TINKER_API_KEY": "tml-test", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([TINKER_CLI, *args], env=env, capture_output=True, text=True, timeout=180, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"tinker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(base_url: str, *args: str):
    return json.loads(tinker_cli(base_url, "-f", "json", *args).stdout)


def checkpoint_dirs(data_dir: Path, run_id: str) -> set[str]:
    root = data_dir / "checkpoints" / run_id
    return {f"{p.parent.name}/{p.name.split('@')[0]}" for p in root.glob("*/*") if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def world(model_dir, tmp_path_factory, tokenizer):
    from tinkerd_testing import Server

    srv = Server(model_dir, tmp_path_factory.mktemp("rest") / "data").start()
    try:
        sc = tinker.ServiceClient(base_url=srv.base_url)
        run_a = sc.create_lora_training_client(base_model=BASE, rank=2, seed=1, user_metadata={"team": "alpha", "n": "1"})
        data = [sft_datum(tokenizer, "Q: What is two plus two?\nA: Four.")]
        run_a.forward_backward(data, "cross_entropy").result()
        run_a.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        a_state = run_a.save_state("a-state", user_metadata={"step": "1"}).result().path
        a_sampler = run_a.save_weights_for_sampler("a-sampler").result().path
        run_b = sc.create_lora_training_client(base_model=BASE, rank=3, seed=2, train_unembed=False)
        b_state = run_b.save_state("b-state").result().path
        run_c = sc.create_lora_training_client(base_model=BASE, rank=2, seed=3).result()
        sampler = sc.create_sampling_client(model_path=a_sampler).result()
        # tinker.RestClient, not sc.create_rest_client(): in SDK 0.38 the latter can deadlock on the
        # ServiceClient's locks while a lazily created training client is still being set up.
        rc = tinker.RestClient(base_url=srv.base_url)
        yield {
            "srv": srv, "sc": sc, "rc": rc, "a": run_a, "b": run_b, "c": run_c, "a_state": a_state, "a_sampler": a_sampler,
            "b_state": b_state, "sampler": sampler, "data": data,
        }
    finally:
        srv.stop()


def run_id_of(tc) -> str:
    return tc.get_info().model_id


def aware(value: dt.datetime) -> bool:
    return value.tzinfo is not None and value.utcoffset() is not None


# -- RestClient ----------------------------------------------------------------------------


def test_list_training_runs_is_paged_newest_first(world):
    rc = world["rc"]
    ids = [run_id_of(world[k]) for k in ("a", "b", "c")]
    first = rc.list_training_runs(limit=2, offset=0).result()
    assert first.cursor.total_count == 3 and first.cursor.limit == 2 and first.cursor.offset == 0
    rest = rc.list_training_runs(limit=2, offset=2).result()
    assert len(first.training_runs) == 2 and len(rest.training_runs) == 1
    assert [r.training_run_id for r in first.training_runs + rest.training_runs] == ids[::-1]
    assert rc.list_training_runs(limit=5, offset=3).result().training_runs == []


def test_get_training_run_and_by_tinker_path(world):
    rc, run_a = world["rc"], run_id_of(world["a"])
    run = rc.get_training_run(run_a).result()
    assert run.training_run_id == run_a and run.base_model == BASE and run.is_lora and run.lora_rank == 2
    assert run.user_metadata == {"team": "alpha", "n": "1"}
    assert aware(run.last_request_time)
    assert run.last_checkpoint.tinker_path == world["a_state"] and run.last_checkpoint.checkpoint_type == "training"
    assert run.last_sampler_checkpoint.tinker_path == world["a_sampler"]
    assert run.last_checkpoint.user_metadata == {"step": "1"}  # internal keys stay internal
    by_path = rc.get_training_run_by_tinker_path(world["a_sampler"]).result()
    assert by_path.training_run_id == run_a
    run_c = rc.get_training_run(run_id_of(world["c"])).result()
    assert run_c.last_checkpoint is None and run_c.last_sampler_checkpoint is None
    with pytest.raises(tinker.NotFoundError):
        rc.get_training_run("sess-nope:train:0").result()


def test_list_checkpoints_of_a_run_and_of_the_user(world):
    rc = world["rc"]
    listed = rc.list_checkpoints(run_id_of(world["a"])).result().checkpoints
    assert {c.tinker_path for c in listed} == {world["a_state"], world["a_sampler"]}
    for c in listed:
        assert c.size_bytes and c.size_bytes > 0 and aware(c.time) and not c.public and c.expires_at is None
    by_id = {c.checkpoint_id: c for c in listed}
    assert by_id["weights/a-state"].checkpoint_type == "training"
    assert by_id["sampler_weights/a-sampler"].checkpoint_type == "sampler"

    everything = rc.list_user_checkpoints().result()
    assert everything.cursor.total_count == len(everything.checkpoints) >= 3
    times = [c.time for c in everything.checkpoints]
    assert times == sorted(times, reverse=True)  # newest first
    page = rc.list_user_checkpoints(limit=1, offset=1).result()
    assert [c.tinker_path for c in page.checkpoints] == [everything.checkpoints[1].tinker_path]
    assert page.cursor.total_count == everything.cursor.total_count
    assert rc.list_checkpoints(run_id_of(world["c"])).result().checkpoints == []


def test_weights_info(world):
    info = world["rc"].get_weights_info_by_tinker_path(world["b_state"]).result()
    assert info.base_model == BASE and info.is_lora and info.lora_rank == 3
    assert info.train_attn and info.train_mlp and info.train_unembed is False
    with pytest.raises(tinker.NotFoundError):
        world["rc"].get_weights_info_by_tinker_path(world["b_state"] + "-missing").result()


def test_publish_unpublish_ttl_and_delete(world):
    rc, sc, run_b = world["rc"], world["sc"], world["b"]
    path = run_b.save_state("to-manage").result().path
    find = lambda: {c.tinker_path: c for c in rc.list_checkpoints(run_id_of(run_b)).result().checkpoints}.get(path)  # noqa: E731
    rc.publish_checkpoint_from_tinker_path(path).result()
    assert find().public
    rc.publish_checkpoint_from_tinker_path(path).result()  # idempotent, no 409 retry loop
    rc.unpublish_checkpoint_from_tinker_path(path).result()
    assert not find().public

    before = dt.datetime.now(dt.timezone.utc)
    rc.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    expires = find().expires_at
    assert aware(expires) and abs((expires - before).total_seconds() - 7200) < 30
    rc.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert find().expires_at is None
    with pytest.raises(tinker.BadRequestError):
        rc.set_checkpoint_ttl_from_tinker_path(path, -5).result()

    assert "weights/to-manage" in checkpoint_dirs(world["srv"].data_dir, run_id_of(run_b))
    rc.delete_checkpoint_from_tinker_path(path).result()
    assert find() is None
    assert "weights/to-manage" not in checkpoint_dirs(world["srv"].data_dir, run_id_of(run_b))  # files freed
    with pytest.raises(tinker.NotFoundError):
        rc.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state(path).result()

    # delete_checkpoint(run, checkpoint_id) addresses the same thing
    other = run_b.save_weights_for_sampler("by-id").result().path
    rc.delete_checkpoint(run_id_of(run_b), "sampler_weights/by-id").result()
    assert other not in {c.tinker_path for c in rc.list_checkpoints(run_id_of(run_b)).result().checkpoints}


def test_ttl_on_save_and_the_janitor_frees_files(world):
    rc, run_c, data_dir = world["rc"], world["c"], world["srv"].data_dir
    run = run_id_of(run_c)
    short = run_c.save_weights_for_sampler("short-lived", ttl_seconds=2).result().path
    kept = run_c.save_state("kept", ttl_seconds=3600).result().path
    later = run_c.save_state("set-later").result().path
    listed = {c.tinker_path: c for c in rc.list_checkpoints(run).result().checkpoints}
    assert listed[short].expires_at is not None and listed[kept].expires_at is not None
    rc.set_checkpoint_ttl_from_tinker_path(later, 1).result()
    deadline = time.time() + 30
    while time.time() < deadline:
        paths = {c.tinker_path for c in rc.list_checkpoints(run).result().checkpoints}
        if short not in paths and later not in paths:
            break
        time.sleep(0.5)
    assert short not in paths and later not in paths and kept in paths
    assert checkpoint_dirs(data_dir, run) == {"weights/kept"}


def test_sessions_and_samplers(world):
    rc, sc = world["rc"], world["sc"]
    session_id = run_id_of(world["a"]).split(":train:")[0]
    assert session_id in rc.list_sessions().result().sessions
    session = rc.get_session(session_id).result()
    assert session.training_run_ids == [run_id_of(world[k]) for k in ("a", "b", "c")]
    sampler_id = world["sampler"]._sampling_session_id
    assert sampler_id in session.sampler_ids
    got = rc.get_sampler(sampler_id).result()
    assert got.base_model == BASE and got.model_path == world["a_sampler"]
    assert rc.list_sessions(limit=1).result().sessions == [rc.list_sessions().result().sessions[0]]
    with pytest.raises(tinker.NotFoundError):
        rc.get_session("sess-unknown").result()
    del sc


def test_metric_history_extension(world):
    run = run_id_of(world["a"])
    body = httpx.get(f"{world['srv'].base_url}/api/v1/training_runs/{run}/metrics", headers={"X-API-Key": "tml-test"}).json()
    keys = {(m["kind"], m["key"]) for m in body["metrics"]}
    assert ("forward_backward", "loss:sum") in keys
    assert all(dt.datetime.fromisoformat(m["time"]).tzinfo is not None for m in body["metrics"])


# -- downloads -----------------------------------------------------------------------------


def test_external_weights_are_served_under_signed_urls(world):
    rc, run_a = world["rc"], world["a"]
    ext = run_a.save_weights_external("ext").result()
    assert ext.path.endswith("/external_weights/ext")
    urls = rc.get_external_weights_urls(ext.path).result()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
    assert aware(urls.expires) and urls.expires > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)
    # a plain GET, no API key: the signature is the credential
    blob = urllib.request.urlopen(urls.urls["adapter_model.safetensors"], timeout=30).read()
    ckpt_dir = next((world["srv"].data_dir / "checkpoints" / run_id_of(run_a) / "external_weights").glob("ext@*"))
    assert blob == (ckpt_dir / "adapter_model.safetensors").read_bytes()
    config = json.loads(urllib.request.urlopen(urls.urls["adapter_config.json"], timeout=30).read())
    assert config["r"] == 2 and config["lora_alpha"] == 32 and config["peft_type"] == "LORA"
    assert "tinkerd" not in config  # nothing PEFT would warn about

    tampered = urls.urls["adapter_config.json"].replace("token=", "token=x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=30)
    assert err.value.code == 403
    # the SDK only asks for external paths; the server says why a weights/ path has no URLs
    refused = httpx.get(
        f"{world['srv'].base_url}/api/v1/training_runs/{run_id_of(run_a)}/checkpoints/weights/a-state/external_weights_urls",
        headers={"X-API-Key": "tml-test"},
    )
    assert refused.status_code == 400 and "save_weights_external" in refused.json()["detail"]
    rc.delete_checkpoint_from_tinker_path(ext.path).result()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urls.urls["adapter_config.json"], timeout=30)
    assert err.value.code == 404  # a deleted checkpoint's URLs stop working


# -- the tinker CLI ------------------------------------------------------------------------


def test_cli_model_list_and_auth_status(world):
    url = world["srv"].base_url
    models = tinker_cli(url, "-f", "json", "model", "list").stdout
    assert BASE in models
    status = tinker_cli(url, "auth", "status")
    assert status.returncode == 0


def test_cli_run_list_and_info(world):
    url = world["srv"].base_url
    runs = cli_json(url, "run", "list")
    listed = json.dumps(runs)
    for key in ("a", "b", "c"):
        assert run_id_of(world[key]) in listed
    limited = tinker_cli(url, "run", "list", "--limit", "1").stdout
    assert "more not shown" in limited
    info = cli_json(url, "run", "info", run_id_of(world["a"]))
    assert json.dumps(info).count(BASE) >= 1 and run_id_of(world["a"]) in json.dumps(info)


def test_cli_checkpoint_list_info_publish_ttl_delete(world):
    url, run_a = world["srv"].base_url, run_id_of(world["a"])
    everything = json.dumps(cli_json(url, "checkpoint", "list"))
    assert world["a_state"] in everything and world["b_state"] in everything
    of_run = json.dumps(cli_json(url, "checkpoint", "list", "--run-id", run_a))
    assert world["a_state"] in of_run and world["b_state"] not in of_run
    info = json.dumps(cli_json(url, "checkpoint", "info", world["a_state"]))
    assert world["a_state"] in info

    path = world["a"].save_state("cli-managed").result().path
    rc = world["rc"]
    find = lambda: {c.tinker_path: c for c in rc.list_checkpoints(run_a).result().checkpoints}.get(path)  # noqa: E731
    tinker_cli(url, "checkpoint", "publish", path)
    assert find().public
    tinker_cli(url, "checkpoint", "unpublish", path)
    assert not find().public
    tinker_cli(url, "checkpoint", "set-ttl", path, "--ttl", "7200")
    assert find().expires_at is not None
    table = tinker_cli(url, "checkpoint", "list", "--run-id", run_a).stdout  # the table format renders our datetimes
    assert "cli-managed" in table
    assert "cli-managed" in tinker_cli(url, "checkpoint", "info", path).stdout
    assert "a-state" in tinker_cli(url, "checkpoint", "list").stdout
    tinker_cli(url, "checkpoint", "set-ttl", path, "--remove")
    assert find().expires_at is None
    tinker_cli(url, "checkpoint", "delete", path, "-y")
    assert find() is None
    missing = tinker_cli(url, "checkpoint", "info", path, check=False)
    assert missing.returncode != 0


def test_cli_download_external_and_training_checkpoints(world, tmp_path):
    url, run_a = world["srv"].base_url, world["a"]
    ext = run_a.save_weights_external("for-cli").result().path
    tinker_cli(url, "checkpoint", "download", ext, "-o", str(tmp_path))
    got = tmp_path / ext.replace("tinker://", "").replace("/", "_")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in got.iterdir()}

    # a weights/ checkpoint goes through a temporary external export that the CLI deletes
    tinker_cli(url, "checkpoint", "download", world["a_state"], "-o", str(tmp_path))
    got_state = tmp_path / world["a_state"].replace("tinker://", "").replace("/", "_")
    config = json.loads((got_state / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 32
    a = load_file(str(got / "adapter_model.safetensors"))
    b = load_file(str(got_state / "adapter_model.safetensors"))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)  # same weights both ways
    leftovers = [c.tinker_path for c in world["rc"].list_user_checkpoints().result().checkpoints if c.tinker_path.endswith("/download")]
    assert leftovers == []

    sampler = tinker_cli(url, "checkpoint", "download", world["a_sampler"], "-o", str(tmp_path), check=False)
    assert sampler.returncode != 0  # the CLI refuses sampler_weights itself
