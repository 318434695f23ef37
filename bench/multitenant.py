"""2. Multi-tenant training: 4 SDK sessions training at once against 1 training alone.

Each tenant is its own `ServiceClient` (its own session) with its own rank-8 LoRA and its
own batch, driven by its own thread: forward_backward + optim_step, S steps. The
single-client figure is tenant 0 alone doing S steps; the shared figure is all tenants'
tokens over the wall time until the last one finishes. Both run in rounds, after a warm-up
step of every tenant. Sharing should cost nothing: aggregate/alone >= 0.95.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Context, Target, close_quietly, log, row, settle
from bench.train_throughput import RANK, make_sequences, sdk_datums, sdk_step


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"tenants": 2, "batch": 1, "seq_len": 16, "steps": 1, "rounds": 1}
    return {"tenants": 4, "batch": 4, "seq_len": 64, "steps": 3, "rounds": 2}


def run(ctx: Context, smoke: bool) -> dict:
    cfg = sizes(smoke)
    tenants, steps = cfg["tenants"], cfg["steps"]
    tokens_per_step = cfg["batch"] * cfg["seq_len"]
    services = [ctx.service_client() for _ in range(tenants)]
    trainers = [s.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=i, train_unembed=False).result()
                for i, s in enumerate(services)]
    datums = [sdk_datums(make_sequences(ctx, cfg["batch"], cfg["seq_len"], seed=100 + i)) for i in range(tenants)]

    def train(i: int) -> float:
        """S steps of tenant i; returns when its last step finished (perf_counter)."""
        for _ in range(steps):
            sdk_step(trainers[i], datums[i])
        return time.perf_counter()

    log(f"multitenant: {tenants} tenants x {cfg['batch']} x {cfg['seq_len']} tokens; warm-up")
    with ThreadPoolExecutor(tenants) as pool:
        list(pool.map(lambda i: sdk_step(trainers[i], datums[i]), range(tenants)))
        settle()
        alone_s: list[float] = []
        shared_s: list[float] = []
        per_tenant_s: list[list[float]] = []
        for round_index in range(cfg["rounds"]):
            start = time.perf_counter()
            train(0)
            alone_s.append(time.perf_counter() - start)
            settle()
            start = time.perf_counter()
            finished = list(pool.map(train, range(tenants)))
            shared_s.append(max(finished) - start)
            per_tenant_s.append([f - start for f in finished])
            settle()
            log(f"multitenant: round {round_index + 1}: alone {tokens_per_step * steps / alone_s[-1]:.0f} tok/s, "
                f"{tenants} at once {tenants * tokens_per_step * steps / shared_s[-1]:.0f} tok/s aggregate")
    for service in services:
        close_quietly(service)

    alone_tps = tokens_per_step * steps * len(alone_s) / sum(alone_s)
    shared_tps = tenants * tokens_per_step * steps * len(shared_s) / sum(shared_s)
    rows = [row(f"{tenants} tenants training, aggregate", shared_tps, "tok/s", alone_tps, Target(">=", 0.95),
                baseline_name="1 tenant alone")]
    details = {**cfg, "tokens_per_step": tokens_per_step, "alone_s": alone_s, "shared_s": shared_s,
               "per_tenant_finish_s": per_tenant_s,
               "slowest_over_fastest_tenant": [max(r) / min(r) for r in per_tenant_s]}
    return {"rows": rows, "details": details}
