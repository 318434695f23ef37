"""9. Bounded memory: the server's resident memory under a long stream of small requests.

A tinkerd process of its own (nothing left over from the other benchmarks) serves N small
sample requests, C at a time: 1-4 new tokens each on a random prompt of 2-8 tokens, four in
five through the SDK's SamplingClient, one in five through the OpenAI routes (completions and
chat, some of them streamed). Every result is fetched, so the server keeps each one for its
retention window after delivery (core/futures.py), then drops it. The server's resident set
size (RSS) is read every second. Reported: RSS after the warm-up (the first W requests), its
peak after that, RSS at the end, and its slope over the second half of the run, by least
squares against requests served. A server that keeps something per request grows by the
same amount for every request and shows a slope; a bounded one is flat.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import API_KEY, Context, Target, log, one_compute_thread, random_tokens, row

SAMPLE_EVERY_S = 1.0


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"requests": 64, "warmup": 16, "concurrency": 8}
    return {"requests": 20000, "warmup": 2000, "concurrency": 32}


def rss_bytes(pid: int) -> int:
    """Resident set size of the process and its children (psutil where installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def slope_per_10k(points: list[tuple[int, int]]) -> float:
    """MB of RSS per 10,000 requests, least squares over (requests served, RSS bytes)."""
    served = np.array([p[0] for p in points], dtype=float)
    rss_mb = np.array([p[1] for p in points], dtype=float) / 2**20
    if len(points) < 2 or served.max() == served.min():
        return 0.0
    return float(np.polyfit(served, rss_mb, 1)[0] * 10_000)


class Load:
    """N small requests from C threads, each taking the next request number when it is free."""

    def __init__(self, ctx: Context, base_url: str, cfg: dict) -> None:
        import tinker
        from openai import OpenAI

        self.ctx, self.cfg = ctx, cfg
        self.tokenizer = ctx.tokenizer  # loaded here, once: transformers' lazy imports are not thread-safe
        service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
        self.samplers = [service.create_sampling_client(base_model=ctx.model_name).result() for _ in range(4)]
        self.oai = OpenAI(base_url=base_url + "/oai/api/v1", api_key=API_KEY, max_retries=0)
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.served = 0
        self.by_route: dict[str, int] = {"sdk sample": 0, "openai completion": 0, "openai chat": 0, "openai stream": 0}
        self.errors: list[str] = []

    def one(self, i: int) -> str:
        from tinker import types

        rng = np.random.default_rng(i)
        prompt = random_tokens(rng, self.ctx.shape.vocab, int(rng.integers(2, 9)))
        max_tokens = int(rng.integers(1, 5))
        if i % 5:
            params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)
            result = self.samplers[i % len(self.samplers)].sample(types.ModelInput.from_ints(prompt), 1, params).result()
            assert result.sequences[0].tokens
            return "sdk sample"
        text = self.tokenizer.decode(prompt)
        if i % 15 == 0:
            stream = self.oai.completions.create(model=self.ctx.model_name, prompt=text, max_tokens=max_tokens, stream=True)
            assert any(chunk.choices for chunk in stream)
            return "openai stream"
        if i % 10 == 0:
            chat = self.oai.chat.completions.create(model=self.ctx.model_name, max_tokens=max_tokens,
                                                    messages=[{"role": "user", "content": text}])
            assert chat.choices
            return "openai chat"
        completion = self.oai.completions.create(model=self.ctx.model_name, prompt=text, max_tokens=max_tokens)
        assert completion.choices
        return "openai completion"

    def worker(self, total: int) -> None:
        while (i := next(self._numbers)) < total:
            try:
                route = self.one(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported: the run fails on any
                with self._lock:
                    self.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    self.served += 1
                continue
            with self._lock:
                self.by_route[route] += 1
                self.served += 1

    def run(self, total: int, concurrency: int) -> None:
        threads = [threading.Thread(target=self.worker, args=(total,), daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def run(ctx: Context, smoke: bool) -> dict:
    from tinkerd_testing import Server

    cfg = sizes(smoke)
    with one_compute_thread():  # memory, not speed, is measured here
        server = Server(ctx.model_dir, ctx.work / "memory-data").start(timeout=300)
    try:
        pid = server.proc.pid
        load = Load(ctx, server.base_url, cfg)
        trace: list[tuple[float, int, int]] = []  # (seconds since the start, requests served, RSS bytes)
        done = threading.Event()
        started = time.perf_counter()

        def watch() -> None:
            while not done.wait(SAMPLE_EVERY_S if not smoke else 0.2):
                trace.append((time.perf_counter() - started, load.served, rss_bytes(pid)))

        trace.append((0.0, 0, rss_bytes(pid)))
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        last_log = [0.0]

        def progress() -> None:
            while not done.wait(30):
                if trace and trace[-1][0] - last_log[0] >= 30:
                    last_log[0] = trace[-1][0]
                    log(f"memory: {trace[-1][1]} requests in {trace[-1][0]:.0f} s, RSS {trace[-1][2] / 2**20:.0f} MB")

        threading.Thread(target=progress, daemon=True).start()
        load.run(cfg["requests"], cfg["concurrency"])
        elapsed = time.perf_counter() - started
        done.set()
        watcher.join()
        trace.append((elapsed, load.served, rss_bytes(pid)))
    finally:
        server.stop()
    if load.errors:
        raise RuntimeError(f"{len(load.errors)} of {cfg['requests']} requests failed, first: {load.errors[0]}")

    after_warmup = [(served, rss) for _, served, rss in trace if served >= cfg["warmup"]]
    start_rss, end_rss = after_warmup[0][1], after_warmup[-1][1]
    peak_rss = max(rss for _, rss in after_warmup)
    half = cfg["warmup"] + (cfg["requests"] - cfg["warmup"]) / 2
    slope = slope_per_10k([(served, rss) for served, rss in after_warmup if served >= half])
    mb = 2**20
    log(f"memory: {cfg['requests']} requests in {elapsed:.0f} s ({cfg['requests'] / elapsed:.0f}/s); RSS at start "
        f"{trace[0][2] / mb:.0f} MB, after warm-up {start_rss / mb:.0f} MB, peak {peak_rss / mb:.0f} MB, end "
        f"{end_rss / mb:.0f} MB; second-half slope {slope:+.1f} MB per 10k requests")
    per_10k_target = 0.02 * start_rss / mb  # 2 % of the server's size per 10,000 requests
    return {
        "rows": [
            row(f"server RSS after {cfg['requests']} small requests", end_rss / mb, "MB", start_rss / mb, Target("<", 1.1),
                baseline_name=f"RSS after {cfg['warmup']} (warm-up)"),
            row("  peak RSS after the warm-up", peak_rss / mb, "MB", start_rss / mb,
                baseline_name=f"RSS after {cfg['warmup']} (warm-up)"),
            row("  RSS slope over the second half, per 10k requests", slope, "MB", None,
                Target("<", round(per_10k_target, 1), on="value")),
            row("  requests served per second", cfg["requests"] / elapsed, "req/s"),
        ],
        "details": {
            **cfg, "elapsed_s": elapsed, "by_route": load.by_route, "rss_source": rss_source(),
            "rss_mb": {"before": trace[0][2] / mb, "after_warmup": start_rss / mb, "peak": peak_rss / mb, "end": end_rss / mb},
            "slope_mb_per_10k_second_half": slope,
            "trace": [(round(t, 1), served, round(rss / mb, 1)) for t, served, rss in trace],
        },
    }


def rss_source() -> str:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "/proc/PID/status VmRSS (the server process)"
    return "psutil (the server and its children)"
