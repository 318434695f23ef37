"""Session traces: bounded in memory, and rendered as Chrome trace events a viewer can draw
(each lane's slices properly nested, a request's wait and work inside its slice)."""

from __future__ import annotations

from tinkerd.core.futures import Failure, FutureStore
from tinkerd.core.traces import RequestSpan, SessionTraces, TraceTag


def span(lane: str, seq_id: int, created: float, started: float | None, computed: float | None, resolved: float,
         error: str | None = None) -> RequestSpan:
    return RequestSpan(TraceTag(lane, "forward_backward", seq_id, {"datums": 1}), f"req-{seq_id}", created, started,
                       computed, resolved, error)


def requests(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "request"]


def test_a_session_keeps_its_latest_requests_and_counts_the_rest():
    traces = SessionTraces(max_spans_per_session=3)
    for i in range(5):
        traces.record("s", span("run", i, i, i, i + 0.5, i + 0.6))
    kept, dropped = traces.spans("s")
    assert [s.tag.seq_id for s in kept] == [2, 3, 4] and dropped == 2
    assert traces.chrome_trace("s")["otherData"]["requests_dropped"] == 2


def test_past_the_overall_bound_the_session_quiet_longest_goes_first():
    traces = SessionTraces(max_spans_per_session=10, max_spans=4)
    traces.record("old", span("a", 1, 0, 0, 1, 1))
    traces.record("busy", span("b", 1, 0, 0, 1, 1))
    traces.record("old", span("a", 2, 1, 1, 2, 2))  # "old" is now the latest to record
    traces.record("busy", span("b", 2, 1, 1, 2, 2))
    traces.record("new", span("c", 1, 2, 2, 3, 3))  # 5 > 4: the session quiet longest ("old") goes
    assert traces.spans("old") == ([], 0)
    assert len(traces.spans("busy")[0]) == 2 and len(traces.spans("new")[0]) == 1


def test_overlapping_requests_of_a_lane_get_threads_of_their_own():
    traces = SessionTraces()
    traces.record("s", span("run", 1, 0.0, 0.1, 1.0, 1.1))
    traces.record("s", span("run", 2, 0.5, 1.0, 2.0, 2.1))  # arrived while seq 1 ran
    traces.record("s", span("run", 3, 1.5, 2.0, 3.0, 3.1))  # arrived after seq 1 ended
    trace = traces.chrome_trace("s")
    by_seq = {e["args"]["seq_id"]: e for e in requests(trace)}
    assert by_seq[1]["tid"] != by_seq[2]["tid"]
    assert by_seq[3]["tid"] == by_seq[1]["tid"]
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names[by_seq[1]["tid"]] == "run" and names[by_seq[2]["tid"]] == "run (2)"
    # Every slice of one thread nests within or follows the ones before it.
    for tid in names:
        slices = sorted(((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == tid),
                        key=lambda s: (s[0], -s[1]))
        open_ends: list[int] = []
        for start, end in slices:
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], (start, end, open_ends)
            open_ends.append(end)


def test_a_request_splits_into_queue_wait_and_compute_within_its_slice():
    traces = SessionTraces()
    traces.record("s", span("run", 1, 10.0, 10.25, 11.0, 11.125))
    (req,) = requests(traces.chrome_trace("s"))
    assert req["dur"] == 1_125_000
    assert req["args"]["queue_wait_us"] == 250_000 and req["args"]["compute_us"] == 750_000
    assert req["args"]["result_wait_us"] == 125_000
    assert req["args"]["seq_id"] == 1 and req["args"]["datums"] == 1


def test_a_request_refused_before_the_engine_has_no_split_but_its_error():
    traces = SessionTraces()
    traces.record("s", span("sampler", 4, 1.0, None, None, 1.001, error="prompt is empty"))
    trace = traces.chrome_trace("s")
    (req,) = requests(trace)
    assert req["args"]["error"] == "prompt is empty" and "queue_wait_us" not in req["args"]
    assert [e for e in trace["traceEvents"] if e.get("cat") in ("queue", "compute")] == []


def test_the_futures_store_records_a_traced_request_once_when_it_resolves():
    traces = SessionTraces()
    store = FutureStore(traces=traces)
    traced = store.create("fwdbwd", "s")
    traced.trace = TraceTag("run", "forward_backward", 1)
    untraced = store.create("create_custom_loss", "s")
    store.resolve(untraced, {})
    assert traces.spans("s") == ([], 0)
    store.resolve(traced, failure=Failure("boom", "server"))
    resolved_at = traced.resolved_at
    store.resolve(traced, {})  # a second resolution is not a second request
    (recorded,), _ = traces.spans("s")
    assert recorded.request_id == traced.request_id and recorded.error == "boom"
    assert recorded.created == traced.created and recorded.resolved == resolved_at
