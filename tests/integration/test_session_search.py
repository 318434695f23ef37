"""Session search (RestClient.search_sessions) through the unmodified SDK and raw HTTP: filters
(session id, project, metadata, owner, status), pages chained by the cursor, the checkpoint
counts and bytes of each session, and what other users see.

alice and bob are in project `team`; carol is not.
"""

from __future__ import annotations

import warnings

import httpx
import pytest
import tinker
from test_cross_user import keys_and_project
from tinker import types

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("session-search") / "data"
    keys = keys_and_project(data_dir, "team")
    srv = Server(model_dir, data_dir).start()
    try:
        sessions = {}
        for i in range(3):  # three plain sessions of alice's, tagged by metadata
            client = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"], user_metadata={"batch": "plain", "i": str(i)})
            sessions[f"plain{i}"] = client.holder.get_session_id()
        team = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"], project_id="team", user_metadata={"batch": "team"})
        training = team.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=5)
        saved = training.save_state("s").result().path
        sessions["team"] = team.holder.get_session_id()
        yield srv, keys, sessions, saved
    finally:
        srv.stop()


def search(srv: Server, key: str, **fields) -> types.SessionSearchResponse:
    rest = tinker.ServiceClient(base_url=srv.base_url, api_key=key).create_rest_client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDK marks search_sessions experimental
        return rest.search_sessions(types.SessionSearchRequest(**fields)).result()


def ids(page: types.SessionSearchResponse) -> list[str]:
    return [s.session_id for s in page.sessions]


def test_filters_and_pages(lab):
    srv, keys, sessions, _ = lab
    plain = search(srv, keys["alice"], user_metadata={"batch": "plain"})
    assert ids(plain) == [sessions["plain2"], sessions["plain1"], sessions["plain0"]]  # newest first
    assert plain.next_cursor is None

    first = search(srv, keys["alice"], user_metadata={"batch": "plain"}, limit=2)
    assert ids(first) == [sessions["plain2"], sessions["plain1"]] and first.next_cursor is not None
    rest = search(srv, keys["alice"], user_metadata={"batch": "plain"}, limit=2, cursor=first.next_cursor)
    assert ids(rest) == [sessions["plain0"]] and rest.next_cursor is None

    assert ids(search(srv, keys["alice"], session_id=sessions["plain1"])) == [sessions["plain1"]]
    assert ids(search(srv, keys["alice"], project_ids=["team"])) == [sessions["team"]]
    active = search(srv, keys["alice"], statuses=[types.ActiveSessionStatusQuery()], user_metadata={"batch": "plain"})
    assert len(ids(active)) == 3 and all(s.status.type == "active" for s in active.sessions)
    assert search(srv, keys["alice"], statuses=[types.FailedSessionStatusQuery()]).sessions == []


def test_counts_owners_and_other_users(lab):
    srv, keys, sessions, _ = lab
    team = search(srv, keys["alice"], session_id=sessions["team"]).sessions[0]
    assert team.owner == "alice" and team.project_id == "team" and team.checkpoints_count == 1
    assert team.checkpoint_storage_bytes and team.checkpoint_storage_bytes > 0
    assert team.user_metadata == {"batch": "team"}

    # bob sees alice's team session when he asks for every accessible one, never her own others
    assert search(srv, keys["bob"]).sessions == []
    seen_by_bob = ids(search(srv, keys["bob"], owner=types.AccessibleSearchOwner()))
    assert seen_by_bob == [sessions["team"]]
    by_owner = ids(search(srv, keys["bob"], owner=types.UserSearchOwner(owner_urns=["alice"])))
    assert by_owner == [sessions["team"]]
    assert search(srv, keys["carol"], owner=types.AccessibleSearchOwner()).sessions == []
    assert search(srv, keys["carol"], session_id=sessions["plain0"], owner=types.AccessibleSearchOwner()).sessions == []


def test_bad_searches_name_the_field(lab):
    srv, keys, _, _ = lab

    def post(key: str, body: dict) -> httpx.Response:
        return httpx.post(srv.base_url + "/api/v1/sessions/search", json=body, headers={"X-API-Key": key}, timeout=30)

    outsider = post(keys["carol"], {"project_ids": ["team"]})
    assert outsider.status_code == 404 and "project_ids" in outsider.json()["detail"]
    assert post(keys["alice"], {"limit": 0}).status_code == 400 and "limit" in post(keys["alice"], {"limit": 0}).json()["detail"]
    bad_cursor = post(keys["alice"], {"cursor": {"last_created_at": "yesterday", "last_session_id": "x"}})
    assert bad_cursor.status_code == 400 and "cursor" in bad_cursor.json()["detail"]
