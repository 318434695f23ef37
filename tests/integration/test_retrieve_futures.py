"""Batched polling of sampling results: the client config turns on the SDK's retrieve_futures
poller and join_sampling_session; the unmodified SDK samples through them (a pickled
SamplingClient joins as a clone of its own), and raw HTTP checks the cursor, the retrieved
ids, the results (still protobuf from retrieve_future) and the errors.
"""

from __future__ import annotations

import pickle
import re

import httpx
import tinker
from tinker import types

from tinkerd_testing import MODEL_NAME, Server

PROMPT = types.ModelInput.from_ints([1, 504, 3458])
GREEDY = types.SamplingParams(max_tokens=3, temperature=0.0)


def post(srv: Server, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/api/v1/" + path, json=body, headers={"X-API-Key": "tml-test", **headers}, timeout=60)


def route_count(srv: Server, route: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text
    pattern = rf'tinkerd_http_requests_total\{{[^}}]*route="{re.escape(route)}"[^}}]*status="200"[^}}]*\}} ([0-9.e+]+)'
    return sum(float(n) for n in re.findall(pattern, text))


def test_the_sdk_samples_through_retrieve_futures_and_clones_join(server: Server, service_client: tinker.ServiceClient):
    polls_before = route_count(server, "/api/v1/retrieve_futures")
    joins_before = route_count(server, "/api/v1/join_sampling_session")
    sampler = service_client.create_sampling_client(base_model=MODEL_NAME)
    futures = [sampler.sample(PROMPT, 1, GREEDY) for _ in range(6)]
    results = [f.result() for f in futures]
    assert all(len(r.sequences[0].tokens) == 3 for r in results)
    assert len({tuple(r.sequences[0].tokens) for r in results}) == 1  # greedy: the same answer each time

    clone = pickle.loads(pickle.dumps(sampler))
    assert clone.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens == results[0].sequences[0].tokens
    assert route_count(server, "/api/v1/retrieve_futures") > polls_before
    assert route_count(server, "/api/v1/join_sampling_session") >= joins_before + 1


def test_raw_polling_cursor_results_and_retrieved_ids(server: Server):
    session_id = post(server, "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}).json()["session_id"]
    sampler_id = post(server, "create_sampling_session", {"session_id": session_id, "sampling_session_seq_id": 0,
                                                          "base_model": MODEL_NAME}).json()["sampling_session_id"]
    clones = [post(server, "join_sampling_session", {"sampling_session_id": sampler_id}).json()["client_counter"] for _ in range(2)]
    assert clones[0] >= 1 and clones[1] == clones[0] + 1
    clone = clones[0]
    body = {"sampling_session_id": sampler_id, "seq_id": clone * 1_000_000_000 + 1, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 504, 3458]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0}}
    request_id = post(server, "asample", body).json()["request_id"]
    bad = dict(body, seq_id=clone * 1_000_000_000 + 2, num_samples=0)  # a sample that fails
    failed_id = post(server, "asample", bad).json()["request_id"]
    target = {"type": "sampling_session", "sampling_session_id": sampler_id, "cloned_sampler_id": clone}

    seen: dict[str, str] = {}
    cursor = 0
    while len(seen) < 2:
        answer = post(server, "retrieve_futures", {"target": target, "prev_cursor": cursor}).json()
        assert answer["cursor"] >= cursor
        cursor = answer["cursor"]
        seen.update({c["request_id"]: c["state"] for c in answer["completions"]})
    assert seen == {request_id: "finished", failed_id: "failed"}
    # another clone's log holds nothing of these; an immediate poll past the cursor is empty
    other = dict(target, cloned_sampler_id=clones[1])
    assert post(server, "retrieve_futures", {"target": other, "timeout": 0}).json() == {"completions": [], "cursor": 0}
    assert post(server, "retrieve_futures", {"target": target, "prev_cursor": cursor, "timeout": 0}).json()["completions"] == []

    # the result itself still comes from retrieve_future, as protobuf when asked
    result = post(server, "retrieve_future", {"request_id": request_id}, Accept="application/x-protobuf")
    assert result.status_code == 200 and result.headers["content-type"].startswith("application/x-protobuf")
    # once reported as retrieved, the result is gone
    post(server, "retrieve_futures", {"target": target, "prev_cursor": cursor, "timeout": 0, "retrieved_request_ids": [request_id]})
    assert "error" in post(server, "retrieve_future", {"request_id": request_id}).json()


def test_bad_polls_name_the_field(server: Server):
    target = {"type": "sampling_session", "sampling_session_id": "sess-nope:sample:0"}
    unknown = post(server, "retrieve_futures", {"target": target, "timeout": 0})
    assert unknown.status_code == 404 and "sess-nope:sample:0" in unknown.json()["detail"]
    assert post(server, "join_sampling_session", {"sampling_session_id": "sess-nope:sample:0"}).status_code == 404
    missing = post(server, "retrieve_futures", {"prev_cursor": 0})
    assert missing.status_code == 400 and "target" in missing.json()["detail"]
    negative = post(server, "retrieve_futures", {"target": target, "prev_cursor": -1})
    assert negative.status_code == 400 and "prev_cursor" in negative.json()["detail"]
