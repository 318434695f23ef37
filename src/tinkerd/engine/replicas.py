"""One base model served by several engines (replicas): `ReplicaRouter`.

The router is itself an `EngineClient`, so the core holds one engine per base model as
always and never learns that there are replicas. It decides where each request goes:

  * training requests of a run go to the replica that holds the run's adapter and
    optimizer state: the replica is chosen when the adapter is created (or loaded), the
    one holding the fewest trainable adapters, and recorded for the adapter's lifetime;
  * sampling of a checkpoint goes to a replica chosen by a stable hash of the checkpoint's
    cache key, so the same checkpoint keeps landing where its adapter (and its prompts'
    cached state) is already warm; in-flight weights (`publish_inflight`) are published on,
    and sampled from, the replica that holds their training run;
  * base-model sampling goes to the replica with the fewest requests in flight.

Replicas are any `EngineClient`s of the same model (Ray actors in practice,
`engine/ray_engine.py`); the router holds no tensor and no engine thread of its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

from tinkerd.engine.client import EngineClient
from tinkerd.types import (
    AdamParams,
    AdapterRef,
    EngineStats,
    ForwardBackwardCall,
    LatencyHistogram,
    LoraSpec,
    SampleRequest,
    TokenEvent,
    UserError,
)


def stable_replica(key: str, replicas: int) -> int:
    """The replica of a checkpoint key: the same in every process and on every run (unlike
    Python's salted `hash`)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % replicas


class ReplicaRouter(EngineClient):
    """The replicas of one base model, behind one `EngineClient` door."""

    def __init__(self, replicas: list[EngineClient]) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = replicas
        self.info = replicas[0].info
        self._lock = threading.Lock()
        self._holder: dict[str, int] = {}  # adapter_id -> the replica holding its state
        self._in_flight = [0] * len(replicas)  # requests sent to each replica and not yet done
        self._sampling: dict[str, int] = {}  # request_id of a running sample -> its replica

    # -- where requests go -------------------------------------------------------------------

    def holder(self, adapter_id: str) -> int:
        """The replica holding `adapter_id`'s state (a UserError for an adapter never created)."""
        with self._lock:
            index = self._holder.get(adapter_id)
        if index is None:
            raise UserError(f"model {adapter_id!r} is not loaded")
        return index

    def _place(self, adapter_id: str) -> int:
        """The replica for a new adapter (an adapter loaded again stays where it is)."""
        with self._lock:
            if adapter_id in self._holder:
                return self._holder[adapter_id]
            held = [0] * len(self.replicas)
            for index in self._holder.values():
                held[index] += 1
            index = min(range(len(self.replicas)), key=lambda i: (held[i], self._in_flight[i], i))
            self._holder[adapter_id] = index
            return index

    def _least_loaded(self) -> int:
        with self._lock:
            return min(range(len(self.replicas)), key=lambda i: (self._in_flight[i], i))

    def _track(self, index: int, future: Future, on_done: Callable[[], None] | None = None) -> Future:
        """Count `future` as in flight on replica `index` until it is done."""
        with self._lock:
            self._in_flight[index] += 1

        def done(_: Future) -> None:
            with self._lock:
                self._in_flight[index] -= 1
            if on_done is not None:
                on_done()

        future.add_done_callback(done)
        return future

    # -- the door --------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> Future:
        index = self._place(adapter_id)
        future = self._track(index, self.replicas[index].create_adapter(adapter_id, spec))
        future.add_done_callback(lambda f: f.exception() is not None and self._forget(adapter_id, index))
        return future

    def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> Future:
        with self._lock:
            existed = adapter_id in self._holder
        index = self._place(adapter_id)
        future = self._track(index, self.replicas[index].load_adapter(adapter_id, directory, with_optimizer))
        if not existed:
            future.add_done_callback(lambda f: f.exception() is not None and self._forget(adapter_id, index))
        return future

    def _forget(self, adapter_id: str, index: int) -> None:
        with self._lock:
            if self._holder.get(adapter_id) == index:
                del self._holder[adapter_id]

    def drop_adapter(self, adapter_id: str) -> Future:
        with self._lock:
            index = self._holder.pop(adapter_id, None)
        if index is None:
            done: Future = Future()
            done.set_result(None)
            return done
        return self._track(index, self.replicas[index].drop_adapter(adapter_id))

    def forward_backward(self, call: ForwardBackwardCall) -> Future:
        index = self.holder(call.adapter_id)
        return self._track(index, self.replicas[index].forward_backward(call))

    def optim_step(self, adapter_id: str, params: AdamParams) -> Future:
        index = self.holder(adapter_id)
        return self._track(index, self.replicas[index].optim_step(adapter_id, params))

    def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool, sampler_key: str | None = None) -> Future:
        index = self.holder(adapter_id)
        return self._track(index, self.replicas[index].save_adapter(adapter_id, directory, with_optimizer, sampler_key))

    def publish_inflight(self, adapter_id: str, ref: AdapterRef) -> Future:
        index = self.holder(adapter_id)
        return self._track(index, self.replicas[index].publish_inflight(adapter_id, ref))

    def sample(self, request: SampleRequest, on_token: Callable[[TokenEvent], None] | None = None) -> Future:
        if request.adapter is not None and request.adapter.inflight_of is not None:
            # In-flight weights live only in the memory of the replica that trains them.
            try:
                index = self.holder(request.adapter.inflight_of)
            except UserError as exc:
                gone: Future = Future()
                gone.set_exception(exc)
                return gone
        elif request.adapter is not None:
            index = stable_replica(request.adapter.key, len(self.replicas))
        else:
            index = self._least_loaded()
        request_id = request.request_id
        with self._lock:
            self._sampling[request_id] = index

        def finished() -> None:
            with self._lock:
                if self._sampling.get(request_id) == index:
                    del self._sampling[request_id]

        return self._track(index, self.replicas[index].sample(request, on_token), finished)

    def cancel(self, request_id: str, sample_index: int | None = None) -> None:
        with self._lock:
            index = self._sampling.get(request_id)
        if index is not None:
            self.replicas[index].cancel(request_id, sample_index)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()

    def stats(self) -> EngineStats:
        return merge_stats([replica.stats() for replica in self.replicas])


def merge_stats(snapshots: list[EngineStats]) -> EngineStats:
    """One model's snapshot from its replicas': gauges, counters and histograms add up."""
    first = snapshots[0]
    counters: dict[str, int] = {}
    for snapshot in snapshots:
        for key, value in snapshot.counters.items():
            counters[key] = counters.get(key, 0) + value
    latencies: dict[str, LatencyHistogram] = {}
    for name, histogram in first.latencies.items():
        others = [s.latencies[name] for s in snapshots[1:] if name in s.latencies]
        latencies[name] = replace(
            histogram,
            counts=tuple(sum(c) for c in zip(histogram.counts, *(o.counts for o in others), strict=True)),
            total_seconds=histogram.total_seconds + sum(o.total_seconds for o in others),
        )
    devices = sorted({s.device for s in snapshots})
    return EngineStats(
        device=",".join(devices),
        dtype=first.dtype,
        queued_jobs=sum(s.queued_jobs for s in snapshots),
        samples_waiting=sum(s.samples_waiting for s in snapshots),
        sample_rows_running=sum(s.sample_rows_running for s in snapshots),
        adapters_trainable=sum(s.adapters_trainable for s in snapshots),
        adapters_cached=sum(s.adapters_cached for s in snapshots),
        memory_bytes=sum(s.memory_bytes for s in snapshots),
        counters=counters,
        latencies=latencies,
    )
