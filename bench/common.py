"""What every benchmark shares: the imported model, a real tinkerd process, SDK clients,
the in-process transformers baselines, the machine's matmul peak, and result rows.

The server is the test suite's `Server` (tests/tinkerd_testing.py): `tinkerd serve` as a
subprocess on a free loopback port, driven by the unmodified tinker SDK. Baselines run in
this process, never while the server is working: the machine has few cores and the two
would compete for them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


for _path in (REPO / "src", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# The test suite's process helper; importing it also sets HF_HOME / HF_HUB_OFFLINE /
# TINKER_TELEMETRY exactly as the tests do, so tokenizer lookups stay offline.
from tinkerd_testing import CACHE, MODEL_NAME, Server  # noqa: E402

API_KEY = "tml-bench"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- result rows ---------------------------------------------------------------------------


@dataclass
class Target:
    """A pass/fail criterion on a row's ratio (or, with on="value", on the value itself)."""

    op: str  # ">=" or "<"
    threshold: float
    on: str = "ratio"

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None:
            return None
        return x >= self.threshold if self.op == ">=" else x < self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}{'x' if self.on == 'ratio' else ''}"


def row(name: str, value: float | None, unit: str, baseline: float | None = None, target: Target | None = None,
        baseline_name: str | None = None, ratio: float | None = None) -> dict:
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    return {
        "name": name, "value": value, "unit": unit, "baseline": baseline, "baseline_name": baseline_name,
        "ratio": ratio, "target": str(target) if target else None,
        "pass": target.met(value, ratio) if target else None,
    }


# -- timing --------------------------------------------------------------------------------


def settle(seconds: float = 0.5) -> None:
    """Pause between the server's and the baseline's turns (spinning worker threads go idle)."""
    time.sleep(seconds)


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def time_in_turns(sides: dict[str, Callable[[], Any]], rounds: int, steps_per_round: int,
                  after_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each side, the sides taking turns round by round (steps_per_round
    calls each), so that load from elsewhere hits them alike."""
    step_s: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(rounds):
        for name, step in sides.items():
            for _ in range(steps_per_round):
                start = time.perf_counter()
                step()
                step_s[name].append(time.perf_counter() - start)
            settle()
        if after_round is not None:
            after_round(round_index, step_s)
    return step_s


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def one_compute_thread() -> Iterator[None]:
    """Servers started inside run torch on one thread. For the benchmarks that measure memory
    or correctness, not speed: on a busy host a team of OpenMP threads spin-waits for its
    descheduled members, and every small request becomes many times slower (a 3-token sample
    took 2-8 s instead of 0.2-0.5 s on a 2-core host with a load average of 8)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


# -- machine ---------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    cpu_model = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    info = {
        "host": platform.node(),
        "cpu_model": cpu_model,
        "cpu_flags": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "git_commit": commit + ("+dirty" if dirty else ""),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    for package in ("transformers", "peft", "tinker"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[package] = None
    if info["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_gflops(m: int, k: int, n: int, min_seconds: float = 0.3) -> float:
    """Measured fp32 GFLOP/s of torch.mm for [m, k] @ [k, n] on this machine, now."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    reps, elapsed = 0, 0.0
    start = time.perf_counter()
    while elapsed < min_seconds or reps < 3:
        torch.mm(a, b, out=out)
        reps += 1
        elapsed = time.perf_counter() - start
    return 2 * m * k * n * reps / elapsed / 1e9


# -- model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelShape:
        cfg = json.loads((model_dir / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["vocab_size"])

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each per-layer projection."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def forward_flops_per_token(self, seq_len: int, lora_rank: int = 0) -> float:
        """Multiply-adds x2 of one token's forward pass in a causal sequence of seq_len tokens."""
        per_layer = sum(2 * i * o for i, o in self.projections().values())
        per_layer += sum(2 * lora_rank * (i + o) for i, o in self.projections().values())
        # QK^T and attention x V: each query attends to (seq_len + 1) / 2 keys on average.
        per_layer += 2 * 2 * self.heads * self.head_dim * (seq_len + 1) / 2
        return self.layers * per_layer + 2 * self.hidden * self.vocab

    def lora_train_flops_per_token(self, seq_len: int, lora_rank: int) -> float:
        """Forward + backward with a frozen base: the backward pass computes activation gradients
        (about one forward's worth) and only the small LoRA weight gradients, not base ones."""
        lora_weight_grads = self.layers * sum(2 * lora_rank * (i + o) for i, o in self.projections().values())
        return 2 * self.forward_flops_per_token(seq_len, lora_rank) + lora_weight_grads

    def matmul_shapes(self, rows: int) -> dict[str, tuple[tuple[int, int, int], int]]:
        """The distinct (m, k, n) matmuls of a forward pass over `rows` tokens, with how many of
        each one forward pass does (projections that share a shape are merged: q/o, k/v, gate/up)."""
        by_shape: dict[tuple[int, int, int], list[str]] = {}
        for name, (i, o) in self.projections().items():
            by_shape.setdefault((rows, i, o), []).append(name)
        shapes = {f"{'+'.join(names)} {k}x{n}": ((m, k, n), len(names) * self.layers) for (m, k, n), names in by_shape.items()}
        shapes[f"lm_head {self.hidden}x{self.vocab}"] = ((rows, self.hidden, self.vocab), 1)
        return shapes


# -- the benchmark context -----------------------------------------------------------------


@dataclass
class Context:
    model_name: str
    model_dir: Path
    work: Path
    smoke: bool
    shape: ModelShape
    _server: Any = None
    _tokenizer: Any = None
    _engine: Any = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, smoke: bool) -> Context:
        from tinkerd.model_store import resolve_model, seed_hf_cache

        log(f"model {MODEL_NAME}: importing into {CACHE} if needed")
        source = resolve_model(MODEL_NAME, CACHE)
        seed_hf_cache(source)
        work = Path(tempfile.mkdtemp(prefix="tinkerd-bench-"))
        return cls(source.name, source.path, work, smoke, ModelShape.from_dir(source.path))

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    def server(self) -> Any:
        """The shared tinkerd process, started on first use (and again if it died)."""
        if self._server is not None and self._server.proc is not None and self._server.proc.poll() is not None:
            log(f"tinkerd exited with {self._server.proc.returncode}; starting a new one")
            self._server = None
        if self._server is None:
            log("starting tinkerd")
            with stopwatch() as elapsed:
                self._server = Server(self.model_dir, self.work / "data").start(timeout=300)
            log(f"tinkerd up on {self._server.base_url} in {elapsed():.1f} s")
        return self._server

    def engine(self) -> Any:
        """tinkerd's engine in this process (no HTTP, no SDK): a reference that separates the
        engine's own speed from the serving path's overhead. Started on first use."""
        if self._engine is None:
            from tinkerd.engine.client import InProcessEngine

            log("loading tinkerd's engine in-process")
            self._engine = InProcessEngine("bench", self.model_dir)
        return self._engine

    def on_torch_thread(self, fn: Any, *args: Any) -> Any:
        """fn(*args) on the in-process engine's thread, the one thread of this process that runs
        torch work: a second thread running parallel torch ops makes a second OpenMP team, and
        with two teams on a small machine every small parallel op of both slows down several
        times (README, "one thread"). The in-process baselines run here for that reason."""
        return self.engine().run_on_engine_thread(fn, *args).result()

    def service_client(self) -> Any:
        import tinker

        return tinker.ServiceClient(base_url=self.server().base_url, api_key=API_KEY)

    def server_log_tail(self, chars: int = 3000) -> str:
        return self._server.log_text()[-chars:] if self._server is not None else ""

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._server is not None:
            self._server.stop()
            self._server = None


def close_quietly(service_client: Any) -> None:
    """End an SDK session so the server frees its adapters before the next benchmark."""
    try:
        service_client.close("success").result(timeout=30)
    except Exception:  # noqa: BLE001 - cleanup only
        pass


# -- in-process transformers baselines ----------------------------------------------------


def load_hf_model(model_dir: Path) -> Any:
    """The plain transformers LlamaForCausalLM in fp32, as a user would load it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def random_tokens(rng: Any, vocab: int, count: int) -> list[int]:
    """Token ids in the ordinary range (skips the first few special ids)."""
    return [int(t) for t in rng.integers(3, vocab, size=count)]
