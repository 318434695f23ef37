"""tinkerd with its metadata on a real PostgreSQL (`--database-url postgresql+psycopg://...`),
driven by the unmodified `tinker` SDK: a user's key made by `tinkerd keys create` against
the same database, training, checkpoints, sampling, the RestClient's listings and changes,
and all of it still there after a restart."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import httpx
import pytest
import tinker
from sqlalchemy import create_engine, text
from tinker import types

from tinkerd_testing import REPO

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEXT = "Q: What is the capital of France?\nA: Paris."


@pytest.fixture
def database(postgres):
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


def create_key(database_url: str, data_dir, name: str) -> str:
    made = subprocess.run([sys.executable, "-m", "tinkerd.cli", "keys", "create", "--name", name, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TINKERD_DATABASE_URL": database_url})
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_the_sdk_flow_with_metadata_on_postgres(start_server, database, tokenizer, tmp_path):
    data_dir = tmp_path / "data"
    key = create_key(database, data_dir, "alice")  # offline, through $TINKERD_DATABASE_URL
    srv = start_server(["--database-url", database], data_dir=data_dir)
    assert httpx.get(srv.base_url + "/api/v1/training_runs", headers={"X-API-Key": "tml-someone-else"}).status_code == 401

    sc = tinker.ServiceClient(base_url=srv.base_url, api_key=key)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=3, user_metadata={"where": "postgres"})
    run_id = tc.get_info().model_id
    ids = tokenizer.encode(TEXT)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    before = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    trained = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert trained < before
    state = tc.save_state("step-1").result().path
    sampler_path = tc.save_weights_for_sampler("step-1").result().path
    sampler = sc.create_sampling_client(model_path=sampler_path)
    prompt = types.ModelInput.from_ints(tokenizer.encode("Q: What is the capital of France?\nA:"))
    sample = sampler.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=4, seed=1)).result()
    assert sample.sequences[0].tokens

    rc = sc.create_rest_client()
    listed = {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}
    assert set(listed) == {state, sampler_path}
    assert listed[state].size_bytes > 0 and listed[state].time.tzinfo is not None and not listed[state].public
    rc.publish_checkpoint_from_tinker_path(state).result()
    rc.set_checkpoint_ttl_from_tinker_path(sampler_path, 3600).result()
    listed = {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}
    assert listed[state].public
    expires = listed[sampler_path].expires_at
    assert expires.tzinfo is not None and abs((expires - dt.datetime.now(dt.timezone.utc)).total_seconds() - 3600) < 60
    run = rc.get_training_run(run_id).result()
    assert run.base_model == BASE and run.lora_rank == 4 and run.user_metadata == {"where": "postgres"}

    # the metadata is in Postgres, not in a SQLite file beside the checkpoints
    assert not (data_dir / "tinkerd.sqlite").exists()
    engine = create_engine(database)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT owner FROM training_runs WHERE id = :id"), {"id": run_id}).scalar() == "alice"
        assert conn.execute(text("SELECT count(*) FROM checkpoints WHERE run_id = :id"), {"id": run_id}).scalar() == 2
    engine.dispose()

    # a restarted server finds all of it, and loads the saved state as it was
    srv.stop()
    srv = start_server(["--database-url", database], data_dir=data_dir, port=srv.port)
    sc = tinker.ServiceClient(base_url=srv.base_url, api_key=key)
    rc = sc.create_rest_client()
    listed = {c.tinker_path: c for c in rc.list_checkpoints(run_id).result().checkpoints}
    assert set(listed) == {state, sampler_path} and listed[state].public
    resumed = sc.create_training_client_from_state(state)
    assert resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(trained, rel=1e-4)
