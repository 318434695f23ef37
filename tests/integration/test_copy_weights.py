"""copy_weights through the unmodified SDK (RestClient.copy_weights) and raw HTTP: the copy is
a new checkpoint of the caller's in the destination project, made once per idempotency key,
whose files outlive the source's; the source must be readable by the caller or by the user of
`weights_access_token`, and the caller must be a member of the destination project.

alice and bob are in project `archive`; carol is not. alice has a private training state and
a private sampler checkpoint.
"""

from __future__ import annotations

import httpx
import pytest
import tinker
from test_cross_user import keys_and_project
from tinker import types

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("copy-weights") / "data"
    keys = keys_and_project(data_dir, "archive")
    srv = Server(model_dir, data_dir).start()
    try:
        alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
        training = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=3)
        paths = {"state": training.save_state("state").result().path,
                 "sampler": training.save_weights_for_sampler("sampler").result().path}
        yield srv, keys, paths
    finally:
        srv.stop()


def rest(srv: Server, key: str) -> tinker.RestClient:
    return tinker.ServiceClient(base_url=srv.base_url, api_key=key).create_rest_client()


def post_copy(srv: Server, key: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/api/v1/copy_weights", json=body, headers={"X-API-Key": key, **headers}, timeout=60)


def test_a_copy_is_the_callers_in_the_project_and_outlives_the_source(lab):
    srv, keys, paths = lab
    alice = rest(srv, keys["alice"])
    copied = alice.copy_weights(paths["sampler"], "archive").result()
    assert copied.startswith("tinker://") and copied != paths["sampler"] and copied.endswith("/sampler_weights/sampler")
    mine = {c.tinker_path: c for c in alice.list_user_checkpoints().result().checkpoints}
    assert mine[copied].size_bytes == mine[paths["sampler"]].size_bytes > 0

    # bob, a member of the project, reads the copy (he could not read alice's private source)
    bob = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"])
    result = bob.create_sampling_client(model_path=copied).sample(
        types.ModelInput.from_ints([1, 504, 3458]), 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result()
    assert len(result.sequences[0].tokens) == 2
    # carol, outside it, sees nothing of it
    gone = post_copy(srv, keys["carol"], {"source_path": copied, "destination_project_id": "archive"})
    assert gone.status_code == 404

    # the copy stays whole when the source is deleted
    state_copy = alice.copy_weights(paths["state"], "archive", ttl_seconds=7200).result()
    alice.delete_checkpoint_from_tinker_path(paths["state"]).result()
    loaded = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["bob"]).create_training_client_from_state(state_copy)
    assert loaded.get_info().model_data.model_name == MODEL_NAME
    expiring = {c.tinker_path: c for c in alice.list_user_checkpoints().result().checkpoints}[state_copy]
    assert expiring.expires_at is not None


def test_a_retried_copy_with_the_same_key_makes_one_copy(lab):
    srv, keys, paths = lab
    body = {"source_path": paths["sampler"], "destination_project_id": "archive"}
    first = post_copy(srv, keys["alice"], body, **{"X-Idempotency-Key": "retry-me"})
    again = post_copy(srv, keys["alice"], body, **{"X-Idempotency-Key": "retry-me"})
    other = post_copy(srv, keys["alice"], body, **{"X-Idempotency-Key": "another"})
    assert first.status_code == again.status_code == other.status_code == 200, first.text
    assert first.json()["tinker_path"] == again.json()["tinker_path"] != other.json()["tinker_path"]
    copies = [c for c in rest(srv, keys["alice"]).list_user_checkpoints().result().checkpoints
              if c.tinker_path in (first.json()["tinker_path"], other.json()["tinker_path"])]
    assert len(copies) == 2


def test_the_weights_access_token_reads_a_source_the_caller_may_not(lab):
    srv, keys, paths = lab
    bob = rest(srv, keys["bob"])
    with pytest.raises(tinker.NotFoundError):
        bob.copy_weights(paths["sampler"], "archive").result()
    copied = bob.copy_weights(paths["sampler"], "archive", weights_access_token=keys["alice"]).result()
    assert copied in {c.tinker_path for c in bob.list_user_checkpoints().result().checkpoints}  # bob's own copy


def test_bad_requests_name_the_field(lab):
    srv, keys, paths = lab
    not_member = post_copy(srv, keys["carol"], {"source_path": paths["sampler"], "destination_project_id": "archive"},
                           **{"X-Tinker-Weights-Access-Token": keys["alice"]})
    assert not_member.status_code == 404 and "archive" in not_member.json()["detail"]
    cases = [
        ({"source_path": "not-a-path", "destination_project_id": "archive"}, 400, "source_path"),
        ({"source_path": paths["sampler"]}, 400, "destination_project_id"),
        ({"source_path": paths["sampler"], "destination_project_id": "nope"}, 404, "nope"),
        ({"source_path": paths["sampler"], "destination_project_id": "archive", "ttl_seconds": 5}, 400, "ttl_seconds"),
        ({"destination_project_id": "archive"}, 400, "source_path"),
    ]
    for body, status, named in cases:
        answer = post_copy(srv, keys["alice"], body)
        assert answer.status_code == status and named in answer.json()["detail"], (body, answer.text)
    bad_token = post_copy(srv, keys["bob"], {"source_path": paths["sampler"], "destination_project_id": "archive"},
                          **{"X-Tinker-Weights-Access-Token": "tml-wrong"})
    assert bad_token.status_code == 400 and "weights_access_token" in bad_token.json()["detail"]
