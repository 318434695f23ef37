"""An engine's counters and latency histograms, kept as plain numbers on the engine thread
and read as an `EngineStats` snapshot from any thread (a scrape takes no lock: a count read
mid-update is off by one, never wrong in kind)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tinkerd.types import LatencyHistogram

# Seconds. Decode steps take milliseconds; first tokens and training passes up to minutes.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COUNTERS = ("decode_steps", "prefill_tokens", "decode_tokens", "train_tokens",
            "adapter_cache_hits", "adapter_cache_misses", "adapter_cache_evictions",
            "prefix_cache_hit_tokens", "prefix_cache_evictions")
LATENCIES = ("time_to_first_token", "decode_step", "forward_backward", "optim_step")


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(BOUNDS, tuple(self.counts), self.total)


class EngineMeter:
    def __init__(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._latencies = {name: _Histogram() for name in LATENCIES}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        self._latencies[name].observe(seconds)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start)

    def timing(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn, its calls observed as latency `name`."""
        def run(*args: Any) -> Any:
            with self.timed(name):
                return fn(*args)
        return run

    def latencies(self) -> dict[str, LatencyHistogram]:
        return {name: h.snapshot() for name, h in self._latencies.items()}
