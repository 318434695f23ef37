"""Session traces: when each request of a session arrived, when the engine began and ended
its work, and when its result was ready, for `tinker session export-trace`.

Each traced request's future carries a `TraceTag` (what the trace calls it: the lane of its
training run or sampler, its name, seq_id and sizes). When the future resolves, the store
records one `RequestSpan` under its session. A session keeps its last
`MAX_SPANS_PER_SESSION` spans; all sessions together keep at most `MAX_SPANS`, and past that
the traces of the sessions that recorded nothing for longest go first. Traces live in
memory only: a restart starts them empty.

`chrome_trace` renders a session's spans in the Chrome trace-event JSON format, which
Perfetto (ui.perfetto.dev) and chrome://tracing open: docs/wire-protocol.md §2.4.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

MAX_SPANS_PER_SESSION = 10_000
MAX_SPANS = 100_000  # about 50 MB
TRACE_PID = 1  # one process in the trace: the session


@dataclass(slots=True)
class TraceTag:
    """What a request is called in its session's trace."""

    lane: str  # the training run (model id) or sampler id the request belongs to
    name: str  # forward_backward, optim_step, sample, ...
    seq_id: int | None
    args: dict[str, Any] = field(default_factory=dict)  # sizes: datums, tokens, samples


@dataclass(slots=True)
class RequestSpan:
    """One finished request. Times are time.monotonic() seconds."""

    tag: TraceTag
    request_id: str
    created: float  # the request arrived
    started: float | None  # the engine began its work (None: the engine does not say)
    computed: float | None  # the engine's work ended (None: no engine work, e.g. refused at once)
    resolved: float  # its result, or failure, was ready for the client
    error: str | None = None


@dataclass
class _SessionTrace:
    spans: deque[RequestSpan] = field(default_factory=lambda: deque(maxlen=MAX_SPANS_PER_SESSION))
    dropped: int = 0  # spans pushed out by the per-session bound


class SessionTraces:
    def __init__(self, max_spans_per_session: int = MAX_SPANS_PER_SESSION, max_spans: int = MAX_SPANS) -> None:
        self._traces: OrderedDict[str, _SessionTrace] = OrderedDict()
        self._per_session = max_spans_per_session
        self._max_spans = max_spans
        self._total = 0
        # Recorded on the event loop, or on the thread that resolves a future before the loop runs.
        self._lock = threading.Lock()

    def record(self, session_id: str, span: RequestSpan) -> None:
        with self._lock:
            trace = self._traces.get(session_id)
            if trace is None:
                trace = self._traces[session_id] = _SessionTrace(deque(maxlen=self._per_session))
            self._traces.move_to_end(session_id)
            if len(trace.spans) == self._per_session:
                trace.dropped += 1
            else:
                self._total += 1
            trace.spans.append(span)
            while self._total > self._max_spans and len(self._traces) > 1:
                _, oldest = self._traces.popitem(last=False)
                self._total -= len(oldest.spans)

    def spans(self, session_id: str) -> tuple[list[RequestSpan], int]:
        """(the session's recorded spans, oldest first; how many older ones the bound dropped)."""
        with self._lock:
            trace = self._traces.get(session_id)
            return (list(trace.spans), trace.dropped) if trace is not None else ([], 0)

    def chrome_trace(self, session_id: str) -> dict[str, Any]:
        """The session's trace as a Chrome trace-event JSON object (docs/wire-protocol.md §2.4)."""
        spans, dropped = self.spans(session_id)
        epoch_offset = time.time() - time.monotonic()  # monotonic stamps -> Unix time

        def us(t: float) -> int:
            return int(round((t + epoch_offset) * 1e6))

        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": TRACE_PID, "tid": 0, "args": {"name": f"session {session_id}"}},
        ]
        # Requests of one lane overlap (the SDK sends the next before the last one finished), and
        # a trace viewer draws one thread's slices as a stack: an overlapping request goes to a
        # further thread of its lane, the first whose previous request had ended.
        thread_ends: dict[str, list[int]] = {}  # lane -> the end of each of its threads' last request
        thread_ids: dict[tuple[str, int], int] = {}
        rendered = []
        for span in sorted(spans, key=lambda s: s.created):
            created = us(span.created)
            started = max(created, us(span.started)) if span.started is not None else None
            computed = max(started if started is not None else created, us(span.computed)) if span.computed is not None else None
            resolved = max(created, started or created, computed or created, us(span.resolved))
            ends = thread_ends.setdefault(span.tag.lane, [])
            slot = next((i for i, end in enumerate(ends) if end <= created), len(ends))
            if slot == len(ends):
                ends.append(resolved)
            ends[slot] = resolved
            tid = thread_ids.setdefault((span.tag.lane, slot), len(thread_ids) + 1)
            rendered.append((span, tid, created, started, computed, resolved))
        for (lane, slot), tid in thread_ids.items():
            name = lane if slot == 0 else f"{lane} ({slot + 1})"
            events.append({"name": "thread_name", "ph": "M", "pid": TRACE_PID, "tid": tid, "args": {"name": name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": TRACE_PID, "tid": tid, "args": {"sort_index": tid}})
        for span, tid, created, started, computed, resolved in rendered:
            args: dict[str, Any] = {"request_id": span.request_id, "lane": span.tag.lane, "seq_id": span.tag.seq_id,
                                    **span.tag.args}
            if started is not None:
                args["queue_wait_us"] = started - created
            if computed is not None:
                args["compute_us"] = computed - (started if started is not None else created)
                args["result_wait_us"] = resolved - computed
            if span.error is not None:
                args["error"] = span.error
            base = {"ph": "X", "pid": TRACE_PID, "tid": tid}
            events.append({"name": span.tag.name, "cat": "request", "ts": created, "dur": resolved - created, **base,
                           "args": args})
            if started is not None:
                events.append({"name": "queued", "cat": "queue", "ts": created, "dur": started - created, **base})
                if computed is not None:
                    events.append({"name": "compute", "cat": "compute", "ts": started, "dur": computed - started, **base})
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {
                "session_id": session_id,
                "clock": "ts and dur in microseconds; ts since the Unix epoch",
                "requests": len(spans),
                "requests_dropped": dropped,
                "max_requests_per_session": self._per_session,
            },
        }
