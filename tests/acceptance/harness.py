"""Runs tinker-cookbook recipes as subprocesses against a tinkerd, and keeps their timings.

Everything SmolLM2-specific the cookbook needs lives here and in shim/, never in tinkerd.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHIM_DIR = Path(__file__).resolve().parent / "shim"
RESULTS_PATH = REPO / "bench" / "results" / "cookbook_acceptance.json"
RECIPE_TIMEOUT_S = float(os.environ.get("TINKERD_COOKBOOK_RECIPE_TIMEOUT", 1200))

# One record per recipe run, written to RESULTS_PATH and printed in the terminal summary.
TIMINGS: list[dict] = []


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RecipeRun:
    name: str
    log_path: Path  # the recipe's log_path (metrics.jsonl, checkpoints.jsonl, logs.log)
    output_path: Path  # the subprocess's stdout + stderr
    returncode: int | None
    wall_s: float
    server: Any  # tests/tinkerd_testing.py: Server
    timed_out: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.log_path / "metrics.jsonl")

    @property
    def checkpoints(self) -> list[dict]:
        return read_jsonl(self.log_path / "checkpoints.jsonl")

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def describe(self) -> str:
        """What a failed assertion shows: the end of the recipe's output and the server's log."""
        return (
            f"\n--- {self.name}: exit {self.returncode}{' (timed out)' if self.timed_out else ''}, "
            f"{self.wall_s:.0f}s; output {self.output_path} ---\n{self.output()[-6000:]}"
            f"\n--- tinkerd log {self.server.log_path} (tail) ---\n{self.server.log_text()[-4000:]}"
        )

    def assert_ok(self) -> None:
        assert self.returncode == 0, self.describe()

    def step_seconds(self, first_step: int = 0) -> list[float]:
        """Seconds per training step, as the recipe timed them.

        RL recipes log `time/total` per step. The SL loop pipelines (submits step k+1, then
        waits for step k), so its step costs `time/submit_batch + time/finish_batch`; the
        wait includes any checkpoint save of that step.
        """
        seconds = []
        for row in self.metrics:
            if row.get("step", 0) < first_step:
                continue
            if isinstance(row.get("time/total"), (int, float)):
                seconds.append(row["time/total"])
            elif "time/finish_batch" in row:
                seconds.append(row.get("time/submit_batch", 0.0) + row["time/finish_batch"])
        return seconds


def matmul_gflops(seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of this machine right now, at SmolLM2's MLP shape (512x576 @ 576x1536).

    docs/engine.md §9 gives ~165 on a quiet 2-core box; other work on the machine lowers it.
    Recorded beside each run's step times so timings from busy and quiet runs compare.
    """
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    a @ b  # warm-up
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        count += 1
    return 2 * 512 * 576 * 1536 * count / elapsed / 1e9


class Cookbook:
    """Runs cookbook recipe modules in the cookbook venv against one tinkerd."""

    def __init__(self, python: Path, server: Any, runs_dir: Path, model_dir: Path):
        self.python = python
        self.server = server
        self.runs_dir = runs_dir
        self.model_dir = model_dir

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("PYTEST_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "PYTHONHOME")
        }
        no_proxy = "127.0.0.1,localhost"
        env.update(
            PYTHONPATH=str(SHIM_DIR),
            TINKERD_SHIM_TOKENIZER_DIR=str(self.model_dir),
            TINKER_BASE_URL=self.server.base_url,
            TINKER_API_KEY="tml-test",
            TINKER_TELEMETRY="0",
            # HF_HOME points at the cache tests/tinkerd_testing.py sets up; never touch the hub.
            HF_HOME=os.environ["HF_HOME"],
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            # The cookbook fetches a pricing JSON over HTTPS at start; make it fail at once.
            https_proxy="http://127.0.0.1:9",
            HTTPS_PROXY="http://127.0.0.1:9",
            no_proxy=no_proxy,
            NO_PROXY=no_proxy,
            WANDB_MODE="disabled",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def run_python(self, code: str) -> str:
        """Run a snippet in the cookbook venv (with the shim) and return its stdout."""
        proc = subprocess.run([str(self.python), "-c", code], env=self.env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def run(
        self, name: str, module: str, args: dict[str, object], timeout: float = RECIPE_TIMEOUT_S, first_step: int = 0
    ) -> RecipeRun:
        """Run `python -m module key=value ...`; `first_step`: where a resumed run's own steps begin."""
        log_path = Path(str(args.get("log_path") or self.runs_dir / name))
        args = {"model_name": MODEL_NAME, "log_path": str(log_path), "behavior_if_log_dir_exists": "delete", **args}
        cmd = [str(self.python), "-m", module, *(f"{key}={value}" for key, value in args.items())]
        output_path = self.runs_dir / f"{name}.out"
        started = time.time()
        load_before = os.getloadavg()[0]
        gflops_before = matmul_gflops()
        timed_out = False
        with open(output_path, "wb") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(), cwd=self.runs_dir, start_new_session=True
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, 9)  # the recipe's own process group, started above
                returncode = proc.wait()
        run = RecipeRun(name, log_path, output_path, returncode, time.time() - started, self.server, timed_out)
        # Other work on the machine slows every step; keep the load beside the timings.
        run.extra["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        run.extra["matmul_gflops"] = [round(gflops_before, 1), round(matmul_gflops(), 1)]
        _record_timing(run, first_step)
        return run


def _record_timing(run: RecipeRun, first_step: int) -> None:
    steps = run.step_seconds(first_step)
    rows = [row for row in run.metrics if row.get("step", 0) >= first_step]
    # Where an RL step's wall time goes (the 16 sample calls run concurrently inside
    # time/sampling), and the sampler-vs-trainer log-prob gap.
    breakdown_keys = (
        "time/sampling", "time/train_step", "time/save_checkpoint", "time/policy_sample:mean", "time/policy_sample:max",
        "optim/kl_sample_train_v1", "optim/kl_sample_train_v2", "async/staleness_max",
    )
    record = {
        "scenario": run.name,
        "exit": run.returncode,
        "wall_s": round(run.wall_s, 1),
        "steps": len(steps),
        "s_per_step": [round(s, 2) for s in steps],
        "mean_s_per_step": round(sum(steps) / len(steps), 2) if steps else None,
        # Steady state: the first step also pays for adapter creation and warm-up.
        "mean_s_per_step_after_first": round(sum(steps[1:]) / len(steps[1:]), 2) if len(steps) > 1 else None,
        "loadavg_1m_start_end": run.extra.get("loadavg_1m"),
        "matmul_gflops_start_end": run.extra.get("matmul_gflops"),
        "cpu_count": os.cpu_count(),
    }
    for key in breakdown_keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            record[key] = [round(v, 2) if key.startswith("time/") else v for v in values]
    TIMINGS.append(record)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps({"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": TIMINGS}, indent=1) + "\n")


def non_finite(rows: list[dict], prefix: str = "") -> list[str]:
    """Names of metrics (with the given prefix) whose value is NaN or infinite."""
    return [
        f"step {row.get('step')}: {key}={value}"
        for row in rows
        for key, value in row.items()
        if key.startswith(prefix) and isinstance(value, float) and not math.isfinite(value)
    ]


