"""What the tinker SDK 0.39 / 0.40 add on top of 0.38, driven as raw HTTP shaped as those
SDKs send it (they are not installable next to 0.38): `base_model` on every checkpoint,
POST /api/v1/checkpoints/search with its keyset cursor, and the weights upload
(external_weights_upload_start, a signed PUT per file, external_weights_upload_finish) whose
tinker:// path the 0.38 SDK then samples. Two users with keys: bob sees none of alice's.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tinker
from test_cross_user import create_key, datum
from tinker import types

from tinkerd_testing import MODEL_NAME, Server

PROMPT = "Q: What is two plus two?\nA: Four."


@pytest.fixture(scope="module")
def world(model_dir, tmp_path_factory, tokenizer):
    data_dir = tmp_path_factory.mktemp("sdk-039") / "data"
    data_dir.mkdir(parents=True)
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob")}
    srv = Server(model_dir, data_dir).start()
    try:
        alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
        tc = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=1)
        tc.forward_backward([datum(tokenizer, PROMPT)], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        paths = {
            "state": tc.save_state("st", user_metadata={"exp": "b"}).result().path,
            "sampler": tc.save_weights_for_sampler("sm", user_metadata={"exp": "a", "seed": "1"}).result().path,
            "ext": tc.save_weights_external("ex").result().path,
        }
        yield {"srv": srv, "keys": keys, "alice": alice, "paths": paths, "run_id": tc.get_info().model_id,
               "http": {u: httpx.Client(base_url=srv.base_url, headers={"X-API-Key": k}, timeout=120) for u, k in keys.items()}}
    finally:
        srv.stop()


def search(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/api/v1/checkpoints/search", json=body)


def test_every_checkpoint_names_its_base_model(world):
    alice = world["http"]["alice"]
    listed = alice.get("/api/v1/checkpoints").json()["checkpoints"]
    assert len(listed) == 3 and {c["base_model"] for c in listed} == {MODEL_NAME}
    of_run = alice.get(f"/api/v1/training_runs/{world['run_id']}/checkpoints").json()["checkpoints"]
    assert {c["base_model"] for c in of_run} == {MODEL_NAME}
    run = alice.get(f"/api/v1/training_runs/{world['run_id']}").json()
    assert run["last_checkpoint"]["base_model"] == run["last_sampler_checkpoint"]["base_model"] == MODEL_NAME


def test_search_filters_by_metadata_type_and_base_model(world):
    alice, paths = world["http"]["alice"], world["paths"]

    def found(**body) -> set[str]:
        response = search(alice, **body)
        assert response.status_code == 200, response.text
        return {c["tinker_path"] for c in response.json()["checkpoints"]}

    assert found() == set(paths.values())
    assert found(user_metadata={"exp": "a"}) == {paths["sampler"]}
    assert found(user_metadata={"exp": "a", "seed": "2"}) == set()  # every pair must hold
    assert found(checkpoint_type="training") == {paths["state"]}
    assert found(checkpoint_type="external") == {paths["ext"]}
    assert found(base_models=[MODEL_NAME], checkpoint_type="sampler") == {paths["sampler"]}
    assert found(base_models=["some/other-model"]) == set()
    assert found(base_models=[]) == set()  # an empty list matches nothing
    assert found(owner={"type": "accessible"}) == set(paths.values())


def test_search_pages_newest_first_with_a_cursor(world):
    alice = world["http"]["alice"]
    everything = search(alice, limit=200).json()
    assert everything["next_cursor"] is None
    pages, cursor = [], None
    while True:
        body = search(alice, limit=1, cursor=cursor).json()
        pages += [c["tinker_path"] for c in body["checkpoints"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert set(cursor) == {"last_created_at", "last_checkpoint_uuid"}
    assert pages == [c["tinker_path"] for c in everything["checkpoints"]]
    times = [c["time"] for c in everything["checkpoints"]]
    assert times == sorted(times, reverse=True)


def test_search_refuses_bad_requests_and_hides_other_users(world):
    alice, bob = world["http"]["alice"], world["http"]["bob"]
    for body, field in [({"limit": 0}, "limit"), ({"checkpoint_type": "nope"}, "checkpoint_type"), ({"checkpoint_type": []}, "checkpoint_type"),
                        ({"cursor": {"last_created_at": "yesterday"}}, "cursor"), ({"frobnicate": 1}, "frobnicate"),
                        ({"owner": {"type": "everyone"}}, "owner")]:
        response = search(alice, **body)
        assert response.status_code == 400 and field in response.text, (body, response.text)
    assert search(alice, project_ids=["not-mine"]).status_code == 404
    for owner in ({"type": "own"}, {"type": "accessible"}, {"type": "user", "owner_urns": ["alice"]}):
        response = search(bob, owner=owner)
        assert response.status_code == 200 and response.json()["checkpoints"] == [], owner


def download_adapter(world, into: Path) -> None:
    """The files of alice's external checkpoint, through the download URLs the server signs."""
    run_id, kind, name = world["paths"]["ext"].removeprefix("tinker://").split("/")
    urls = world["http"]["alice"].get(f"/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls").json()["urls"]
    for file_name, url in urls.items():
        (into / file_name).write_bytes(httpx.get(url).content)


def test_uploaded_adapter_samples_by_its_path_like_the_original(world, tmp_path):
    alice, bob = world["http"]["alice"], world["http"]["bob"]
    download_adapter(world, tmp_path)
    start = alice.post("/api/v1/external_weights_upload_start",
                       json={"base_model": MODEL_NAME, "lora_config": {"rank": 2}, "destination_project_id": None})
    assert start.status_code == 200, start.text
    started = start.json()
    assert set(started["urls"]) == {"adapter_config.json", "adapter_model.safetensors"} and started["expires"]
    finish_early = alice.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]})
    assert finish_early.status_code == 400 and "PUT" in finish_early.text
    for file_name, url in started["urls"].items():
        put = httpx.put(url, content=(tmp_path / file_name).read_bytes())  # no API key: the signature is the credential
        assert put.status_code == 200, put.text
    assert bob.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]}).status_code == 404
    finish = alice.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]})
    assert finish.status_code == 200, finish.text
    path = finish.json()["tinker_path"]
    assert path.startswith("tinker://") and "/external_weights/" in path

    prompt = types.ModelInput.from_ints([1, 2, 3, 4, 5, 6])
    original = world["alice"].create_sampling_client(model_path=world["paths"]["ext"]).compute_logprobs(prompt).result()
    uploaded = world["alice"].create_sampling_client(model_path=path).compute_logprobs(prompt).result()
    assert uploaded == pytest.approx(original, abs=1e-5)
    base = world["alice"].create_sampling_client(base_model=MODEL_NAME).compute_logprobs(prompt).result()
    assert uploaded != pytest.approx(base, abs=1e-5)  # the adapter is in effect

    found = search(alice, checkpoint_type="external", base_models=[MODEL_NAME]).json()["checkpoints"]
    assert path in {c["tinker_path"] for c in found}
    assert bob.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404
    assert path not in {c["tinker_path"] for c in search(bob, owner={"type": "accessible"}).json()["checkpoints"]}
    # finished: its URLs take nothing more, and it cannot be finished twice
    assert httpx.put(started["urls"]["adapter_config.json"], content=b"{}").status_code == 404
    assert alice.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]}).status_code == 404


def test_upload_refuses_what_it_cannot_use(world, tmp_path):
    alice = world["http"]["alice"]
    for body, status, field in [
        ({"base_model": "no/such-model", "lora_config": {"rank": 2}}, 400, "unknown base model"),
        ({"base_model": MODEL_NAME}, 400, "lora_config"),
        ({"base_model": MODEL_NAME, "lora_config": {"rank": 0}}, 400, "rank"),
        ({"base_model": MODEL_NAME, "lora_config": {"rank": 2}, "destination_project_id": "not-mine"}, 404, "not-mine"),
    ]:
        response = alice.post("/api/v1/external_weights_upload_start", json=body)
        assert response.status_code == status and field in response.text, (body, response.text)
    started = alice.post("/api/v1/external_weights_upload_start", json={"base_model": MODEL_NAME, "lora_config": {"rank": 3}}).json()
    url = started["urls"]["adapter_model.safetensors"]
    assert httpx.put(url.replace("token=", "token=x"), content=b"x").status_code == 403
    download_adapter(world, tmp_path)  # a rank-2 adapter, for a rank-3 upload
    for file_name, file_url in started["urls"].items():
        assert httpx.put(file_url, content=(tmp_path / file_name).read_bytes()).status_code == 200
    finish = alice.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]})
    assert finish.status_code == 400 and "rank" in finish.text
    newer = alice.post("/api/v1/external_weights_upload_start", headers={"X-Stainless-Package-Version": "0.40.0"},
                       json={"base_model": MODEL_NAME, "lora_config": {"rank": 2}}).json()
    assert set(newer["urls"]["adapter_config.json"]) == {"url", "headers"}


def test_two_finishes_at_once_make_one_checkpoint(world, tmp_path):
    """A client that retries a finish whose answer it did not see, while the first still runs:
    one checkpoint, and the other finish is a 4xx that says why (never a second checkpoint)."""
    alice = world["http"]["alice"]
    download_adapter(world, tmp_path)
    started = alice.post("/api/v1/external_weights_upload_start",
                         json={"base_model": MODEL_NAME, "lora_config": {"rank": 2}}).json()
    for file_name, url in started["urls"].items():
        assert httpx.put(url, content=(tmp_path / file_name).read_bytes()).status_code == 200
    external_before = search(alice, checkpoint_type="external", limit=200).json()["checkpoints"]

    both_ready = threading.Barrier(2)

    def finish() -> httpx.Response:
        with httpx.Client(base_url=world["srv"].base_url, headers={"X-API-Key": world["keys"]["alice"]}, timeout=120) as client:
            both_ready.wait()
            return client.post("/api/v1/external_weights_upload_finish", json={"upload_id": started["upload_id"]})

    with ThreadPoolExecutor(2) as pool:
        answers = sorted(pool.map(lambda _: finish(), range(2)), key=lambda r: r.status_code)
    assert answers[0].status_code == 200, answers[0].text
    path = answers[0].json()["tinker_path"]
    other = answers[1]
    if other.status_code == 200:
        assert other.json()["tinker_path"] == path
    else:
        assert other.status_code in (404, 409) and started["upload_id"] in other.json()["detail"], other.text
    external_after = search(alice, checkpoint_type="external", limit=200).json()["checkpoints"]
    new = {c["tinker_path"] for c in external_after} - {c["tinker_path"] for c in external_before}
    assert new == {path}
