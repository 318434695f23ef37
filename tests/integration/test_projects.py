"""Projects (`tinkerd projects`), through the unmodified SDK, the OpenAI SDK and raw HTTP:
a session created with a project puts its runs and checkpoints in it, every member reads
them (lists filtered by project, sampling, loading, the metric history, the OpenAI routes),
only the owner changes them, and a user outside the project sees nothing. A
`weights_access_token` (the key of someone who may read a checkpoint) loads what the caller
alone may not.

alice and bob are in project `vision`; carol is not.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import tinker
from test_cross_user import datum, keys_and_project
from tinker import types

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory, tokenizer):
    data_dir = tmp_path_factory.mktemp("projects") / "data"
    keys = keys_and_project(data_dir, "vision")
    srv = Server(model_dir, data_dir).start()
    try:
        alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"], project_id="vision")
        shared = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=1)
        shared.forward_backward([datum(tokenizer, "Q: Two plus two?\nA: Four.")], "cross_entropy").result()
        shared.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        paths = {
            "state": shared.save_state("shared-state").result().path,
            "sampler": shared.save_weights_for_sampler("shared-sampler").result().path,
            "run": shared.model_id,
        }
        solo = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])  # no project
        private = solo.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=2)
        paths["private_state"] = private.save_state("private-state").result().path
        paths["private_run"] = private.model_id
        yield srv, keys, paths, solo
    finally:
        srv.stop()


def client(srv: Server, key: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=srv.base_url, api_key=key)


def get(srv: Server, key: str, path: str, **params) -> httpx.Response:
    return httpx.get(srv.base_url + path, headers={"X-API-Key": key}, params=params, timeout=60)


def test_members_read_the_projects_runs_and_checkpoints(lab):
    srv, keys, paths, _ = lab
    bob = client(srv, keys["bob"])
    rest = bob.create_rest_client()
    in_project = rest.list_training_runs(access_scope="accessible", project_id="vision").result()
    assert [run.training_run_id for run in in_project.training_runs] == [paths["run"]]
    everything = rest.list_training_runs(access_scope="accessible").result()
    assert paths["private_run"] not in [run.training_run_id for run in everything.training_runs]
    assert rest.list_training_runs(project_id="vision").result().training_runs == []  # "owned": none of them is bob's
    checkpoints = {c.tinker_path for c in rest.list_checkpoints(paths["run"]).result().checkpoints}
    assert checkpoints == {paths["state"], paths["sampler"]}
    assert get(srv, keys["bob"], f"/api/v1/training_runs/{paths['run']}/metrics").json()["metrics"]

    tokens = bob.create_sampling_client(model_path=paths["sampler"]).sample(
        types.ModelInput.from_ints([1, 504, 3458]), 1, types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    assert len(tokens.sequences[0].tokens) == 3
    loaded = bob.create_training_client_from_state(paths["state"])
    assert loaded.get_info().model_data.model_name == MODEL_NAME

    oai = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=keys["bob"])
    assert paths["sampler"] in {m.id for m in oai.models.list()}
    assert oai.completions.create(model=paths["sampler"], prompt="Two plus two is", max_tokens=2).choices[0].text is not None

    # Reading is shared; changing stays the owner's.
    refused = httpx.delete(srv.base_url + f"/api/v1/training_runs/{paths['run']}/checkpoints/sampler_weights/shared-sampler",
                           headers={"X-API-Key": keys["bob"]}, timeout=60)
    assert refused.status_code == 403 and "vision" in refused.json()["detail"]


def test_someone_outside_the_project_sees_nothing_of_it(lab):
    srv, keys, paths, _ = lab
    carol = keys["carol"]
    assert get(srv, carol, "/api/v1/training_runs", access_scope="accessible", project_id="vision").json()["training_runs"] == []
    assert get(srv, carol, f"/api/v1/training_runs/{paths['run']}").status_code == 404
    assert get(srv, carol, f"/api/v1/training_runs/{paths['run']}/metrics").status_code == 404
    assert get(srv, carol, f"/api/v1/training_runs/{paths['run']}/checkpoints").status_code == 404
    oai = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=carol)
    assert paths["sampler"] not in {m.id for m in oai.models.list()}
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=paths["sampler"], prompt="Hi", max_tokens=1)
    # Nor may she put a session in it: an existing project she is not in answers as an unknown one.
    for project in ("vision", "no-such-project"):
        answer = httpx.post(srv.base_url + "/api/v1/create_session", headers={"X-API-Key": carol}, timeout=60,
                            json={"tags": [], "user_metadata": None, "sdk_version": tinker.__version__, "project_id": project})
        assert answer.status_code == 404 and "unknown project" in answer.json()["detail"]


def test_a_session_moved_into_the_project_takes_its_runs_along(lab):
    srv, keys, paths, solo = lab
    rest = solo.create_rest_client()
    session_id = solo.holder.get_session_id()
    carol_rest = client(srv, keys["carol"]).create_rest_client()
    with pytest.raises(tinker.NotFoundError):  # not her session
        carol_rest.assign_session_project(session_id, "vision").result()
    assert get(srv, keys["bob"], f"/api/v1/training_runs/{paths['private_run']}").status_code == 404
    rest.assign_session_project(session_id, "vision").result()
    assert get(srv, keys["bob"], f"/api/v1/training_runs/{paths['private_run']}").status_code == 200
    assert get(srv, keys["carol"], f"/api/v1/training_runs/{paths['private_run']}").status_code == 404


def test_a_weights_access_token_loads_what_its_user_may_read(lab):
    srv, keys, paths, _ = lab
    carol = client(srv, keys["carol"])
    with pytest.raises(Exception, match="does not exist"):  # hers alone, the state is unknown
        carol.create_training_client_from_state(paths["private_state"]).get_info()
    with pytest.raises(Exception, match="weights_access_token"):
        carol.create_training_client_from_state(paths["private_state"], weights_access_token="tml-not-a-key").get_info()
    loaded = carol.create_training_client_from_state(paths["private_state"], weights_access_token=keys["alice"])
    assert loaded.get_info().model_data.model_name == MODEL_NAME
    # The loaded run is carol's own: she trains it, alice's stays as it was.
    assert get(srv, keys["carol"], f"/api/v1/training_runs/{loaded.model_id}").status_code == 200
