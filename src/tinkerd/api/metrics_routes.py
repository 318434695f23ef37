"""GET /metrics: what an operator watches, in Prometheus' text format (prometheus_client).

Per engine (label `base_model`): the queue, sample rows waiting and running, adapters
trainable and cached, device memory in use; counters of decode steps, tokens (prefill,
decode, train) and the sampler's adapter cache; histograms of the time to first token, a
decode step, a forward_backward pass and an optimizer step. For the server: HTTP requests by
route template and status, futures pending, checkpoints and their bytes by kind, and the
data dir's disk. Labels stay low-cardinality: never a run, session, request or user id.

The route is open (no API key), as Prometheus scrapers expect; nothing in it names a user or
their work. Engine figures are read from `EngineClient.stats()` at scrape time.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from tinkerd.core.service import Service

METRICS_PATH = "/metrics"

_COUNTERS = {  # EngineStats.counters key → (metric, help, extra label)
    "decode_steps": ("tinkerd_engine_decode_steps", "Decode steps run", None),
    "prefill_tokens": ("tinkerd_engine_tokens", "Tokens processed, by kind", ("kind", "prefill")),
    "decode_tokens": ("tinkerd_engine_tokens", "Tokens processed, by kind", ("kind", "decode")),
    "train_tokens": ("tinkerd_engine_tokens", "Tokens processed, by kind", ("kind", "train")),
    "prefix_cache_hit_tokens": ("tinkerd_engine_tokens", "Tokens processed, by kind", ("kind", "prefill_cached")),
    "adapter_cache_hits": ("tinkerd_engine_adapter_cache", "Sampler adapter cache lookups and evictions", ("result", "hit")),
    "adapter_cache_misses": ("tinkerd_engine_adapter_cache", "Sampler adapter cache lookups and evictions", ("result", "miss")),
    "adapter_cache_evictions": ("tinkerd_engine_adapter_cache", "Sampler adapter cache lookups and evictions",
                                ("result", "eviction")),
    "prefix_cache_evictions": ("tinkerd_engine_prefix_cache_evictions", "Prompt K/V entries the sampler's prefix cache let go",
                               None),
}
_LATENCIES = {
    "time_to_first_token": "Seconds from a sample request reaching the engine to its first token",
    "decode_step": "Seconds per decode step (every running row advances one token)",
    "forward_backward": "Seconds per forward/backward pass (calls of several adapters may share one)",
    "optim_step": "Seconds per optimizer step",
}


class ServiceCollector:
    """Reads the service and its engines when Prometheus scrapes."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        gauges = {
            "queued_jobs": GaugeMetricFamily("tinkerd_engine_queued_jobs", "Training and checkpoint jobs waiting for the engine",
                                             labels=["base_model"]),
            "samples_waiting": GaugeMetricFamily("tinkerd_engine_samples_waiting", "Sample requests not yet decoding",
                                                 labels=["base_model"]),
            "sample_rows_running": GaugeMetricFamily("tinkerd_engine_sample_rows_running", "Sequences decoding now",
                                                     labels=["base_model"]),
        }
        adapters = GaugeMetricFamily("tinkerd_engine_adapters", "Adapters in engine memory, by kind", labels=["base_model", "kind"])
        memory = GaugeMetricFamily("tinkerd_engine_memory_bytes", "Memory in use on the engine's device", labels=["base_model", "device"])
        counters: dict[str, CounterMetricFamily] = {}
        histograms = {
            name: HistogramMetricFamily(f"tinkerd_engine_{name}_seconds", text, labels=["base_model"]) for name, text in _LATENCIES.items()
        }
        for base_model, engine in service.engines.items():
            stats = engine.stats()
            for field, gauge in gauges.items():
                gauge.add_metric([base_model], getattr(stats, field))
            adapters.add_metric([base_model, "trainable"], stats.adapters_trainable)
            adapters.add_metric([base_model, "cached"], stats.adapters_cached)
            memory.add_metric([base_model, stats.device], stats.memory_bytes)
            for key, (metric, text, extra) in _COUNTERS.items():
                family = counters.get(metric)
                if family is None:
                    family = counters[metric] = CounterMetricFamily(
                        metric, text, labels=["base_model"] + ([extra[0]] if extra else []))
                family.add_metric([base_model] + ([extra[1]] if extra else []), stats.counters.get(key, 0))
            for name, histogram in histograms.items():
                observed = stats.latencies[name]
                cumulative, buckets = 0, []
                for bound, count in zip((*observed.bounds, float("inf")), observed.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                histogram.add_metric([base_model], buckets, observed.total_seconds)
        yield from gauges.values()
        yield adapters
        yield memory
        yield from counters.values()
        yield from histograms.values()

        yield GaugeMetricFamily("tinkerd_futures_pending", "Requests whose result is not there yet", value=service.futures.pending())
        count = GaugeMetricFamily("tinkerd_checkpoints", "Checkpoints, by kind", labels=["kind"])
        size = GaugeMetricFamily("tinkerd_checkpoint_bytes", "Bytes of checkpoint files, by kind", labels=["kind"])
        for kind, (n, nbytes) in sorted(service.registry.checkpoint_usage().items()):
            count.add_metric([kind], n)
            size.add_metric([kind], nbytes)
        yield count
        yield size
        disk = shutil.disk_usage(service.data_dir)
        data_dir = GaugeMetricFamily("tinkerd_data_dir_disk_bytes", "The data dir's file system", labels=["state"])
        data_dir.add_metric(["used"], disk.used)
        data_dir.add_metric(["free"], disk.free)
        yield data_dir


def build_metrics(service: Service) -> tuple[APIRouter, Callable[[Request, Callable], Awaitable[Response]]]:
    """The /metrics route, and the HTTP middleware that counts every request."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    requests = Counter("tinkerd_http_requests", "HTTP requests, by route template, method and status",
                       ["route", "method", "status"], registry=registry)

    async def count_requests(request: Request, call_next: Callable) -> Response:
        def count(status: int) -> None:
            route = request.scope.get("route")
            # The route's template (`/api/v1/training_runs/{run_id}`), never the path itself: ids
            # in label values would make a series per run.
            requests.labels(getattr(route, "path", "unmatched"), request.method, str(status)).inc()

        try:
            response = await call_next(request)
        except Exception:
            count(500)  # answered outside, by the app's InternalErrors
            raise
        count(response.status_code)
        return response

    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router, count_requests
