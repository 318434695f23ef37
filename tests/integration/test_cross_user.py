"""Two users with real keys (`tinkerd keys create`) on one server: each sees and changes only
their own sessions, runs, samplers and checkpoints, plus what the other published, through
every door: the unmodified tinker SDK, RestClient, the `tinker` CLI, the OpenAI SDK, and raw
HTTP with the other user's ids and paths guessed. What a user may not read answers 404, never
403; an admin reaches everything.

alice has run A1 (a private training state, a private sampler checkpoint, a private external
checkpoint, and a published sampler checkpoint and training state) and run A2 (all private);
bob has run B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tinkerd_testing import MODEL_NAME, REPO, Server

TINKER_CLI = str(Path(sys.executable).with_name("tinker"))


def tinkerd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "tinkerd.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def create_key(data_dir: Path, name: str, *extra: str) -> str:
    proc = tinkerd("keys", "create", "--name", name, "--data-dir", str(data_dir), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def keys_and_project(data_dir: Path, project: str) -> dict[str, str]:
    """The API keys of alice, bob and carol in a new data dir, where alice and bob are members
    of project `project` and carol is not; made before a server starts on the data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob", "carol")}
    made = tinkerd("projects", "create", project, "--member", "alice", "--member", "bob", "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    return keys


def datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


@pytest.fixture(scope="module")
def world(model_dir, tmp_path_factory, tokenizer):
    data_dir = tmp_path_factory.mktemp("cross-user") / "data"
    data_dir.mkdir(parents=True)
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob")}
    keys["root"] = create_key(data_dir, "root", "--admin")
    srv = Server(model_dir, data_dir).start()
    try:
        alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
        a1 = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=1)
        data = [datum(tokenizer, "Q: What is two plus two?\nA: Four.")]
        a1.forward_backward(data, "cross_entropy").result()
        a1.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        paths = {
            "a_state": a1.save_state("a-state").result().path,
            "a_private": a1.save_weights_for_sampler("a-private").result().path,
            "a_ext": a1.save_weights_external("a-ext").result().path,
            "a_public": a1.save_weights_for_sampler("a-public").result().path,
            "a_public_state": a1.save_state("a-public-state").result().path,
        }
        a2 = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=2)
        paths["a2_state"] = a2.save_state("a2-state").result().path
        alice_rest = tinker.RestClient(base_url=srv.base_url, api_key=keys["alice"])
        alice_rest.publish_checkpoint_from_tinker_path(paths["a_public"]).result()
        alice_rest.publish_checkpoint_from_tinker_path(paths["a_public_state"]).result()
        bob = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"])
        b = bob.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=3)
        paths["b_sampler"] = b.save_weights_for_sampler("b-sampler").result().path
        yield {
            "srv": srv, "keys": keys, "alice": alice, "bob": bob, "a1": a1, "a2": a2, "b": b, "data": data,
            "a1_id": a1.get_info().model_id, "a2_id": a2.get_info().model_id, "b_id": b.get_info().model_id,
            "alice_rest": alice_rest, "bob_rest": tinker.RestClient(base_url=srv.base_url, api_key=keys["bob"]),
            "root_rest": tinker.RestClient(base_url=srv.base_url, api_key=keys["root"]), **paths,
        }
    finally:
        srv.stop()


def http(world, who: str) -> httpx.Client:
    return httpx.Client(base_url=world["srv"].base_url + "/api/v1", headers={"X-API-Key": world["keys"][who]}, timeout=60)


def session_of(model_id: str) -> str:
    return model_id.split(":")[0]


# -- the tinker SDK ----------------------------------------------------------------------------


def test_sdk_sampling_and_loading_another_users_private_checkpoints_is_not_found(world):
    bob = world["bob"]
    for path in (world["a_private"], world["a_state"], world["a2_state"]):
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=path).sample(
                types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result()
    for path in (world["a_state"], world["a2_state"]):
        with pytest.raises(tinker.NotFoundError):
            bob.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        world["b"].load_state(world["a_state"]).result()
    # bob's own training client still works after its refused load (the refusal used up its seq_id)
    world["b"].forward_backward(world["data"], "cross_entropy").result()


def test_sdk_published_checkpoints_are_usable_by_everyone(world):
    bob = world["bob"]
    out = bob.create_sampling_client(model_path=world["a_public"]).sample(
        types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=3, temperature=0)).result()
    assert len(out.sequences[0].tokens) == 3
    copy = bob.create_training_client_from_state(world["a_public_state"]).result()
    copy.forward_backward(world["data"], "cross_entropy").result()
    copy_id = copy.get_info().model_id
    # the copy is bob's run: in his list, not in alice's
    assert copy_id in {r.training_run_id for r in world["bob_rest"].list_training_runs().result().training_runs}
    assert copy_id not in {r.training_run_id for r in world["alice_rest"].list_training_runs().result().training_runs}


def test_training_requests_on_another_users_model_are_not_found_and_leave_it_alone(world):
    a1_id, bob = world["a1_id"], http(world, "bob")
    # guesses at alice's next seq_ids: none of them may be used up in her name
    for seq in range(1, 12):
        fb = pb.ForwardBackwardRequest(model_id=a1_id, seq_id=seq, loss_fn="cross_entropy").SerializeToString()
        assert bob.post("/forward_backward", content=fb, headers={"Content-Type": "application/x-protobuf"}).status_code == 404
        assert bob.post("/optim_step", json={"model_id": a1_id, "seq_id": seq, "adam_params": {"learning_rate": 1.0}}
                        ).status_code == 404
        assert bob.post("/save_weights", json={"model_id": a1_id, "seq_id": seq, "path": "stolen"}).status_code == 404
        assert bob.post("/save_weights_for_sampler", json={"model_id": a1_id, "seq_id": seq, "path": "x"}).status_code == 404
        assert bob.post("/load_weights", json={"model_id": a1_id, "seq_id": seq, "path": world["b_sampler"],
                                                "optimizer": False}).status_code == 404
    assert bob.post("/get_info", json={"model_id": a1_id}).status_code == 404
    assert bob.post("/create_model", json={"session_id": session_of(a1_id), "model_seq_id": 50, "base_model": MODEL_NAME}
                    ).status_code == 404
    # alice's run trains on, in order, and nothing was saved under it
    a1 = world["a1"]
    a1.forward_backward(world["data"], "cross_entropy").result()
    a1.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    names = {c.checkpoint_id for c in world["alice_rest"].list_checkpoints(a1_id).result().checkpoints}
    assert "weights/stolen" not in names and "sampler_weights/x" not in names


def test_another_key_cannot_end_or_see_your_session(world):
    a1_id, bob = world["a1_id"], http(world, "bob")
    alice_session = session_of(a1_id)
    assert bob.post("/session_heartbeat", json={"session_id": alice_session}).status_code == 410
    assert bob.post(f"/sessions/{alice_session}/finish").status_code == 404
    assert bob.get(f"/sessions/{alice_session}").status_code == 404
    listed = bob.get("/sessions", params={"limit": 1000}).json()["sessions"]
    assert alice_session not in listed and session_of(world["b_id"]) in listed
    assert bob.get("/sessions", params={"limit": 1000, "access_scope": "accessible"}).json()["sessions"] == listed
    assert bob.post("/create_sampling_session", json={"session_id": alice_session, "sampling_session_seq_id": 90,
                                                      "base_model": MODEL_NAME}).status_code == 404
    # alice's session and training state are untouched
    assert http(world, "alice").post("/session_heartbeat", json={"session_id": alice_session}).status_code == 200
    world["a1"].forward_backward(world["data"], "cross_entropy").result()


def test_samplers_and_futures_of_another_user_are_unknown(world):
    alice, bob = http(world, "alice"), http(world, "bob")
    session = alice.post("/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "0"}).json()["session_id"]
    sampler = alice.post("/create_sampling_session", json={"session_id": session, "sampling_session_seq_id": 0,
                                                           "model_path": world["a_private"]}).json()["sampling_session_id"]
    body = {"sampling_session_id": sampler, "seq_id": 1, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0}}
    request_id = alice.post("/asample", json=body).json()["request_id"]
    assert bob.get(f"/samplers/{sampler}").status_code == 404
    assert bob.post("/asample", json={**body, "seq_id": 2}).status_code == 404
    stolen = bob.post("/retrieve_future", json={"request_id": request_id}).json()
    assert stolen["category"] == "server" and "unknown request" in stolen["error"]
    assert alice.get(f"/samplers/{sampler}").json()["model_path"] == world["a_private"]
    assert alice.post("/retrieve_future", json={"request_id": request_id}).status_code == 200
    assert alice.post(f"/sessions/{session}/finish").status_code == 200


# -- RestClient and raw REST -----------------------------------------------------------------


def test_runs_lists_show_only_what_the_caller_may_see(world):
    bob_rest, a1_id, a2_id, b_id = world["bob_rest"], world["a1_id"], world["a2_id"], world["b_id"]
    owned = {r.training_run_id for r in bob_rest.list_training_runs(limit=100).result().training_runs}
    assert b_id in owned and a1_id not in owned and a2_id not in owned
    accessible = {r.training_run_id for r in bob_rest.list_training_runs(limit=100, access_scope="accessible").result().training_runs}
    assert accessible >= owned | {a1_id} and a2_id not in accessible  # A1 has published checkpoints, A2 none
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(a2_id).result()
    seen = bob_rest.get_training_run(a1_id).result()  # visible through its published checkpoints ...
    assert seen.last_sampler_checkpoint.tinker_path == world["a_public"]  # ... and shows only those
    assert seen.last_checkpoint.tinker_path == world["a_public_state"]
    listed = {c.tinker_path for c in bob_rest.list_checkpoints(a1_id).result().checkpoints}
    assert listed == {world["a_public"], world["a_public_state"]}
    with pytest.raises(tinker.NotFoundError):
        bob_rest.list_checkpoints(a2_id).result()
    mine = {c.tinker_path for c in bob_rest.list_user_checkpoints(limit=1000).result().checkpoints}
    assert world["b_sampler"] in mine and not any(p.startswith(f"tinker://{a1_id}") for p in mine)
    bob = http(world, "bob")
    assert bob.get(f"/training_runs/{a1_id}/metrics").status_code == 404  # training history is not published
    accessible_ckpts = {c["tinker_path"] for c in bob.get("/checkpoints", params={"access_scope": "accessible"}).json()["checkpoints"]}
    assert {world["a_public"], world["a_public_state"]} <= accessible_ckpts and world["a_private"] not in accessible_ckpts
    assert bob.get("/training_runs", params={"access_scope": "everything"}).status_code == 400


def test_checkpoint_management_of_another_users_checkpoints(world):
    bob_rest, alice_rest = world["bob_rest"], world["alice_rest"]
    for path in (world["a_private"], world["a_state"]):
        for action in (bob_rest.delete_checkpoint_from_tinker_path, bob_rest.publish_checkpoint_from_tinker_path,
                       bob_rest.unpublish_checkpoint_from_tinker_path):
            with pytest.raises(tinker.NotFoundError):
                action(path).result()
        with pytest.raises(tinker.NotFoundError):
            bob_rest.set_checkpoint_ttl_from_tinker_path(path, 60).result()
        with pytest.raises(tinker.NotFoundError):
            bob_rest.get_weights_info_by_tinker_path(path).result()
    # a published checkpoint may be read, not changed
    assert bob_rest.get_weights_info_by_tinker_path(world["a_public_state"]).result().lora_rank == 2
    for action in (bob_rest.delete_checkpoint_from_tinker_path, bob_rest.unpublish_checkpoint_from_tinker_path):
        with pytest.raises(tinker.PermissionDeniedError):
            action(world["a_public"]).result()
    a1 = {c.tinker_path: c for c in alice_rest.list_checkpoints(world["a1_id"]).result().checkpoints}
    assert {world["a_private"], world["a_state"], world["a_public"]} <= set(a1)
    assert a1[world["a_public"]].public and not a1[world["a_private"]].public and a1[world["a_private"]].expires_at is None


def test_download_urls_only_for_who_may_read(world):
    with pytest.raises(tinker.NotFoundError):
        world["bob_rest"].get_external_weights_urls(world["a_ext"]).result()
    bob = http(world, "bob")
    a1_id = world["a1_id"]
    assert bob.get(f"/training_runs/{a1_id}/checkpoints/sampler_weights/a-private/external_weights_urls").status_code == 404
    public = bob.get(f"/training_runs/{a1_id}/checkpoints/sampler_weights/a-public/external_weights_urls")
    assert public.status_code == 200 and "adapter_model.safetensors" in public.json()["urls"]
    urls = world["alice_rest"].get_external_weights_urls(world["a_ext"]).result().urls
    assert httpx.get(urls["adapter_config.json"]).status_code == 200  # the signed URL itself needs no key


# -- the tinker CLI ---------------------------------------------------------------------------


def tinker_cli(world, who: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": world["srv"].base_url, "TINKER_API_KEY": world["keys"][who], "HF_HUB_OFFLINE": "1"}
    return subprocess.run([TINKER_CLI, *args], env=env, capture_output=True, text=True, timeout=180)


def test_cli_shows_and_changes_only_what_the_caller_may(world):
    a1_id, a2_id = world["a1_id"], world["a2_id"]
    runs = json.loads(tinker_cli(world, "bob", "-f", "json", "run", "list").stdout)
    assert world["b_id"] in json.dumps(runs) and a1_id not in json.dumps(runs) and a2_id not in json.dumps(runs)
    checkpoints = tinker_cli(world, "bob", "-f", "json", "checkpoint", "list").stdout
    assert "b-sampler" in checkpoints and a1_id not in checkpoints
    of_a1 = tinker_cli(world, "bob", "-f", "json", "checkpoint", "list", "--run-id", a1_id).stdout
    assert "a-public" in of_a1 and "a-private" not in of_a1 and "a-state\"" not in of_a1
    for args in (("run", "info", a2_id), ("checkpoint", "info", world["a_private"])):
        assert tinker_cli(world, "bob", *args).returncode != 0, args
    deleted = tinker_cli(world, "bob", "checkpoint", "delete", world["a_private"], "--yes")  # reports failures, exits 0
    assert "does not exist" in deleted.stdout + deleted.stderr
    assert world["a_private"] in {c.tinker_path for c in world["alice_rest"].list_checkpoints(a1_id).result().checkpoints}
    assert a1_id in tinker_cli(world, "alice", "-f", "json", "run", "list").stdout


# -- the OpenAI SDK ---------------------------------------------------------------------------


def test_openai_models_and_completions_per_user(world):
    bob = openai.OpenAI(base_url=world["srv"].base_url + "/oai/api/v1", api_key=world["keys"]["bob"], max_retries=0, timeout=120)
    ids = {m.id for m in bob.models.list()}
    assert {MODEL_NAME, world["b_sampler"], world["a_public"]} <= ids and world["a_private"] not in ids
    for model in (world["a_private"], world["a_state"]):
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model=model, prompt="Hi", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve(model)
    assert bob.completions.create(model=world["a_public"], prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None
    alice = openai.OpenAI(base_url=world["srv"].base_url + "/v1", api_key=world["keys"]["alice"], max_retries=0, timeout=120)
    assert world["a_private"] in {m.id for m in alice.models.list()} and world["b_sampler"] not in {m.id for m in alice.models.list()}


# -- admins and the console -------------------------------------------------------------------


def test_an_admin_reaches_everything(world):
    root = world["root_rest"]
    assert root.get_training_run(world["a2_id"]).result().model_owner == "alice"
    every = {r.training_run_id for r in root.list_training_runs(limit=100, access_scope="accessible").result().training_runs}
    assert {world["a1_id"], world["a2_id"], world["b_id"]} <= every
    assert {r.training_run_id for r in root.list_training_runs(limit=100).result().training_runs}.isdisjoint(every)  # owned: none
    root_oai = openai.OpenAI(base_url=world["srv"].base_url + "/v1", api_key=world["keys"]["root"], max_retries=0, timeout=120)
    assert world["a_private"] in {m.id for m in root_oai.models.list()}
    root.set_checkpoint_ttl_from_tinker_path(world["a2_state"], 3600).result()
    assert http(world, "root").get(f"/training_runs/{world['a1_id']}/metrics").json()["metrics"]


def test_console_routes_answer_per_user(world):
    bob = http(world, "bob")
    assert bob.get("/server_status").status_code == 200
    runs = bob.get("/training_runs", params={"limit": 100}).json()["training_runs"]
    assert [r["training_run_id"] for r in runs] and all(r["model_owner"] == "bob" for r in runs)
    assert bob.get(f"/training_runs/{world['a2_id']}").status_code == 404
    assert bob.get(f"/training_runs/{world['a2_id']}/checkpoints").status_code == 404
