"""Futures: request id → result, with long polling.

Results are produced on the engine thread and handed to the event loop; a
`retrieve_future` call waits on an asyncio.Event for up to its hold time.

Results do not live forever (a long RL session makes thousands, some of them large
sample results): one that was delivered is kept for `DELIVERED_RETENTION_S` after its
first delivery, long enough for the SDK to poll it again after a lost response, then
dropped; one that no client ever fetched is dropped `UNCLAIMED_RETENTION_S` after it was
resolved; those of an ended session go with the session.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinkerd.core.traces import RequestSpan, SessionTraces, TraceTag

DELIVERED_RETENTION_S = 300.0
UNCLAIMED_RETENTION_S = 3600.0
_SWEEP_EVERY_S = 10.0


@dataclass
class Failure:
    message: str
    category: str  # "user" | "server"


@dataclass
class FutureEntry:
    request_id: str
    kind: str  # what the result is: "fwdbwd", "sample", "optim", "json", ...
    session_id: str | None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None
    failure: Failure | None = None
    created: float = field(default_factory=time.monotonic)
    wire_cache: Any = None  # the API layer may cache the encoded result here
    resolved_at: float | None = None
    delivered_at: float | None = None  # first time a poll received the result
    owner: str | None = None  # the user whose queued work this is (core/work_cap.py counts it)
    # For the session's trace (core/traces.py): what it calls this request (None: not traced),
    # and when the engine began and ended its work (time.monotonic()).
    trace: TraceTag | None = None
    started: float | None = None
    computed: float | None = None


class FutureStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic, traces: SessionTraces | None = None) -> None:
        """`traces`: where a traced entry's span goes once it resolves."""
        self.traces = traces
        self._entries: dict[str, FutureEntry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock
        self._last_sweep = clock()
        self._pending_by_owner: dict[str, int] = {}

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def create(self, kind: str, session_id: str | None, owner: str | None = None) -> FutureEntry:
        entry = FutureEntry(request_id=f"req-{uuid.uuid4().hex}", kind=kind, session_id=session_id, created=self._clock(),
                            owner=owner)
        self._entries[entry.request_id] = entry
        if owner is not None:
            self._pending_by_owner[owner] = self._pending_by_owner.get(owner, 0) + 1
        if entry.created - self._last_sweep >= _SWEEP_EVERY_S:  # amortised: no timer of its own
            self.sweep()
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def pending(self) -> int:
        """Futures whose result is not there yet."""
        return sum(1 for e in list(self._entries.values()) if not e.event.is_set())

    def pending_of(self, owner: str) -> int:
        """Futures of `owner` whose result is not there yet."""
        return self._pending_by_owner.get(owner, 0)

    def sweep(self) -> int:
        """Drop results past their retention (module docstring); returns how many."""
        now = self._last_sweep = self._clock()
        expired = [
            rid for rid, e in self._entries.items()
            if (e.delivered_at is not None and now - e.delivered_at > DELIVERED_RETENTION_S)
            or (e.delivered_at is None and e.resolved_at is not None and now - e.resolved_at > UNCLAIMED_RETENTION_S)
        ]
        for rid in expired:
            del self._entries[rid]
        return len(expired)

    def get(self, request_id: str) -> FutureEntry | None:
        return self._entries.get(request_id)

    def forget(self, request_id: str) -> None:
        """Drop a result the client reported as fully retrieved (core/completions.py)."""
        entry = self._entries.get(request_id)
        if entry is not None and entry.event.is_set():
            del self._entries[request_id]

    def resolve(self, entry: FutureEntry, result: Any = None, failure: Failure | None = None) -> None:
        """Thread-safe: may be called from the engine thread."""

        def _set() -> None:
            first = not entry.event.is_set()
            if entry.owner is not None and first:
                left = self._pending_by_owner.get(entry.owner, 1) - 1
                if left > 0:
                    self._pending_by_owner[entry.owner] = left
                else:
                    self._pending_by_owner.pop(entry.owner, None)
            entry.result = result
            entry.failure = failure
            entry.resolved_at = self._clock()
            entry.event.set()
            if first and self.traces is not None and entry.trace is not None and entry.session_id is not None:
                self.traces.record(entry.session_id, RequestSpan(
                    entry.trace, entry.request_id, entry.created, entry.started, entry.computed, entry.resolved_at,
                    failure.message if failure is not None else None,
                ))

        if self._loop is None:
            _set()
        else:
            self._loop.call_soon_threadsafe(_set)

    async def wait(self, entry: FutureEntry, timeout: float) -> bool:
        """Wait up to `timeout` for the result; True when it is there, and the caller
        delivers it (which starts its retention)."""
        try:
            await asyncio.wait_for(entry.event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        if entry.delivered_at is None:
            entry.delivered_at = self._clock()
        return True

    def drop_session(self, session_id: str) -> None:
        for rid in [r for r, e in self._entries.items() if e.session_id == session_id and e.event.is_set()]:
            del self._entries[rid]

    def fail_all_pending(self, message: str) -> None:
        for entry in self._entries.values():
            if not entry.event.is_set():
                self.resolve(entry, failure=Failure(message, "server"))
