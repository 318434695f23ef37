"""Identity through the unmodified SDK and CLI: the SDK exchanges its key for an identity
token (`/auth/token`) and works with it; `RestClient.whoami` and `tinker auth whoami` name the
caller; `/auth/apikey/me` (what `tinker auth login` checks a key with) describes the key, and
its DELETE (`tinker auth logout`) revokes it, which also ends the tokens issued for it. A
tampered or foreign token answers 401 `invalid_token`, which makes the SDK exchange again.
"""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
import tinker
from test_cross_user import TINKER_CLI, create_key

from tinkerd_testing import MODEL_NAME, Server


@pytest.fixture(scope="module")
def lab(model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("identity") / "data"
    data_dir.mkdir(parents=True)
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob", "dora")}
    srv = Server(model_dir, data_dir).start()
    try:
        yield srv, keys
    finally:
        srv.stop()


def exchange(srv: Server, key: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/api/v1/auth/token", json={}, headers={"X-API-Key": key}, timeout=30)


def test_whoami_names_the_caller_through_the_sdk_and_cli(lab, tmp_path):
    srv, keys = lab
    alice = tinker.ServiceClient(base_url=srv.base_url, api_key=keys["alice"])
    identity = alice.create_rest_client().whoami().result()
    assert identity.user_urn == "tml:user:alice" and identity.org_urn == "tml:organization:tinkerd"
    # every request of this client went with the token, and works
    training = alice.create_lora_training_client(base_model=MODEL_NAME, rank=2, seed=1)
    assert training.get_info().model_data.model_name == MODEL_NAME

    env = {**os.environ, "TINKER_API_KEY": keys["bob"], "TINKER_BASE_URL": srv.base_url, "HOME": str(tmp_path)}
    shown = subprocess.run([TINKER_CLI, "-f", "json", "auth", "whoami"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "tml:user:bob" in shown.stdout and "alice" not in shown.stdout


def test_apikey_me_describes_and_deletes_the_key(lab):
    srv, keys = lab
    me = httpx.get(srv.base_url + "/api/v1/auth/apikey/me", headers={"X-API-Key": keys["bob"]}, timeout=30)
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["name"] == "bob" and body["key_id"] > 0 and body["details"]["user_details"]["email"] == "bob"

    token = exchange(srv, keys["dora"]).json()["jwt"]
    assert httpx.get(srv.base_url + "/api/v1/sessions", headers={"X-API-Key": token}, timeout=30).status_code == 200
    deleted = httpx.delete(srv.base_url + "/api/v1/auth/apikey/me", headers={"X-API-Key": keys["dora"]}, timeout=30)
    assert deleted.status_code == 200, deleted.text
    assert httpx.get(srv.base_url + "/api/v1/auth/apikey/me", headers={"X-API-Key": keys["dora"]}, timeout=30).status_code == 401
    refused = httpx.get(srv.base_url + "/api/v1/sessions", headers={"X-API-Key": token}, timeout=30)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]


def test_tokens_cannot_be_forged_or_exchanged_again(lab):
    srv, keys = lab
    token = exchange(srv, keys["alice"]).json()["jwt"]
    header, body, signature = token.split(".")
    forged = f"{header}.{body}.{signature[:-2]}AA"
    answer = httpx.get(srv.base_url + "/api/v1/sessions", headers={"X-API-Key": forged}, timeout=30)
    assert answer.status_code == 401 and "invalid_token" in answer.headers["www-authenticate"]
    again = exchange(srv, token)
    assert again.status_code == 400 and "X-API-Key" in again.json()["detail"]
    assert json.loads(json.dumps(exchange(srv, "tml-unknown").json()))["detail"].startswith("invalid API key")
