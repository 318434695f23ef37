"""Completion logs of sampling sessions, for batched polling (`retrieve_futures`).

With `sample_use_retrieve_futures` in its client config, a SamplingClient does not long-poll
each sample's future: one background poller per (sampling session, clone) asks which of its
requests finished, and only then fetches each result with `retrieve_future`. A clone is one
SamplingClient of a sampling session (an unpickled copy has its own); its sample seq_ids are
`clone * 1_000_000_000 + n`, and `join_sampling_session` hands each new clone its number.

Each (sampler, clone) has a log of completions in the order they happened, numbered by a
cursor that only grows. A poll passes the cursor of the last answer it received: everything
at or before it was seen and is dropped, and the rest is answered (or, when there is none
yet, awaited up to the poll's hold time). The ids a poll reports as retrieved have had their
results fetched, so the futures store may forget them at once.

A sampler's logs live as long as the sampler: when it ends (its session finishes or stops
heartbeating), Service drops them, so a long-running server's memory does not grow with
every sampler it ever served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tinkerd.core.futures import FutureEntry, FutureStore

CLONE_STRIDE = 1_000_000_000  # the SDK's seq_id range per clone


def clone_of(seq_id: int | None) -> int:
    return (seq_id or 0) // CLONE_STRIDE


@dataclass
class Completion:
    cursor: int
    request_id: str
    failed: bool


@dataclass
class CompletionLog:
    completions: list[Completion] = field(default_factory=list)
    last_cursor: int = 0
    tracked: set[str] = field(default_factory=set)  # request ids logged or awaited
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class CompletionLogs:
    def __init__(self, futures: FutureStore):
        self.futures = futures
        self._logs: dict[tuple[str, int], CompletionLog] = {}
        self._clients: dict[str, int] = {}  # sampler id -> the highest clone number handed out
        self._watchers: set[asyncio.Task] = set()

    def _log(self, sampler_id: str, clone: int) -> CompletionLog:
        return self._logs.setdefault((sampler_id, clone), CompletionLog())

    def track(self, sampler_id: str, seq_id: int | None, entry: FutureEntry) -> None:
        """Log `entry`'s completion under its sampler and clone once it resolves (a retried
        sample answers the same entry: it is logged once)."""
        log = self._log(sampler_id, clone_of(seq_id))
        if entry.request_id in log.tracked:
            return
        log.tracked.add(entry.request_id)

        async def watch() -> None:
            await entry.event.wait()
            log.last_cursor += 1
            log.completions.append(Completion(log.last_cursor, entry.request_id, entry.failure is not None))
            log.changed.set()

        task = asyncio.get_running_loop().create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def poll(self, sampler_id: str, clone: int, prev_cursor: int, hold_seconds: float,
                   retrieved: list[str]) -> tuple[list[Completion], int]:
        """The completions after `prev_cursor` (waiting up to `hold_seconds` for one), and the
        cursor to pass next time."""
        log = self._log(sampler_id, clone)
        for request_id in retrieved:
            if request_id in log.tracked:
                log.tracked.discard(request_id)
                self.futures.forget(request_id)
        log.completions = [c for c in log.completions if c.cursor > prev_cursor]
        if not log.completions and hold_seconds > 0:
            log.changed.clear()
            try:
                await asyncio.wait_for(log.changed.wait(), hold_seconds)
            except asyncio.TimeoutError:
                pass
        fresh = [c for c in log.completions if c.cursor > prev_cursor]
        return fresh, max([prev_cursor] + [c.cursor for c in fresh])

    def drop_sampler(self, sampler_id: str) -> None:
        """Forget an ended sampler's logs and clone numbers. A poll awaiting one of its logs
        answers at once with what it has; a sample still running logs into the dropped log,
        which goes with its watcher."""
        for key in [k for k in self._logs if k[0] == sampler_id]:
            self._logs.pop(key).changed.set()
        self._clients.pop(sampler_id, None)

    def holds(self, sampler_id: str) -> bool:
        """Whether anything of `sampler_id` is kept (a log or a clone number)."""
        return sampler_id in self._clients or any(k[0] == sampler_id for k in self._logs)

    def join(self, sampler_id: str) -> int:
        """A clone number no other client of the sampler has (the original client is 0)."""
        self._clients[sampler_id] = self._clients.get(sampler_id, 0) + 1
        return self._clients[sampler_id]
