"""Futures' results are kept as long as a client may still poll for them, and no longer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tinkerd.core.futures import DELIVERED_RETENTION_S, UNCLAIMED_RETENTION_S, FutureStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def deliver(store: FutureStore, entry) -> bool:  # noqa: ANN001
    """A poll for the result, as retrieve_future makes it: on a loop of its own thread (this
    one may already run a loop, as other tests' clients leave it)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, store.wait(entry, timeout=0.01)).result()


def test_a_delivered_result_stays_for_re_polls_then_goes():
    clock = Clock()
    store = FutureStore(clock)
    entry = store.create("sample", "session-1")
    store.resolve(entry, {"tokens": [1, 2, 3]})
    assert deliver(store, entry)
    clock.now += DELIVERED_RETENTION_S - 1
    store.sweep()
    assert store.get(entry.request_id) is entry and deliver(store, entry)  # a re-poll after a lost response
    clock.now += 2  # retention counts from the first delivery, not the last poll
    store.sweep()
    assert store.get(entry.request_id) is None


def test_pending_results_are_never_dropped_and_unclaimed_ones_go_after_an_hour():
    clock = Clock()
    store = FutureStore(clock)
    pending, unclaimed = store.create("fwdbwd", "s"), store.create("fwdbwd", "s")
    store.resolve(unclaimed, {"loss": 1.0})
    clock.now += UNCLAIMED_RETENTION_S + 1
    store.sweep()
    assert store.get(pending.request_id) is pending and store.get(unclaimed.request_id) is None


def test_creating_futures_sweeps_without_a_timer():
    """A long RL session makes thousands of results: the store stays the size of what is
    still pollable while the session keeps sending requests."""
    clock = Clock()
    store = FutureStore(clock)
    for _ in range(2000):
        entry = store.create("sample", "rl-session")
        store.resolve(entry, {"tokens": list(range(100))})
        assert deliver(store, entry)
        clock.now += 1.0
    assert len(store) <= DELIVERED_RETENTION_S + 20  # about the last five minutes' worth, not 2000
