"""6. Scaling: how the time of one training step grows with batch size, sequence length
and the number of adapters training at once.

A step is forward_backward + optim_step through the SDK (rank-8 LoRA on attention + MLP).
Each configuration gets one warm-up step and then S measured steps; the figure is the
median. For the adapter count, N training clients (one session) each take a step at the
same time from N threads, and the figure is the wall time until all N steps are done.
"Linear" is what the time would be if it grew exactly with the tokens per step from the
first configuration of the sweep; below it means the larger work amortises fixed costs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Context, close_quietly, log, median
from bench.train_throughput import RANK, make_sequences, sdk_datums, sdk_step


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": [1, 2], "batch_len": 16, "seq_len": [16, 32], "len_batch": 1,
                "adapters": [1, 2], "adapter_batch": 1, "adapter_len": 16, "steps": 1}
    return {"batch": [1, 2, 4, 8], "batch_len": 64, "seq_len": [32, 64, 128, 256], "len_batch": 2,
            "adapters": [1, 2, 4, 8], "adapter_batch": 2, "adapter_len": 64, "steps": 2}


def run(ctx: Context, smoke: bool) -> dict:
    cfg = sizes(smoke)
    service = ctx.service_client()
    trainers = [service.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=i, train_unembed=False).result()
                for i in range(max(cfg["adapters"]))]
    tables: dict[str, list[dict]] = {"batch size": [], "sequence length": [], "adapters": []}

    def measure(adapters: int, batch: int, seq_len: int) -> float:
        datums = [sdk_datums(make_sequences(ctx, batch, seq_len, seed=200 + i)) for i in range(adapters)]
        with ThreadPoolExecutor(adapters) as pool:
            def one_round() -> float:
                start = time.perf_counter()
                list(pool.map(lambda i: sdk_step(trainers[i], datums[i]), range(adapters)))
                return time.perf_counter() - start

            one_round()  # warm-up
            return median([one_round() for _ in range(cfg["steps"])])

    sweeps = [
        ("batch size", [(1, b, cfg["batch_len"]) for b in cfg["batch"]]),
        ("sequence length", [(1, cfg["len_batch"], n) for n in cfg["seq_len"]]),
        ("adapters", [(a, cfg["adapter_batch"], cfg["adapter_len"]) for a in cfg["adapters"]]),
    ]
    for sweep, configs in sweeps:
        first_tokens = first_seconds = None
        for adapters, batch, seq_len in configs:
            seconds = measure(adapters, batch, seq_len)
            tokens = adapters * batch * seq_len
            if first_tokens is None:
                first_tokens, first_seconds = tokens, seconds
            entry = {"adapters": adapters, "batch": batch, "seq_len": seq_len, "tokens_per_step": tokens,
                     "step_s": seconds, "tokens_per_s": tokens / seconds, "vs_first": seconds / first_seconds,
                     "linear": tokens / first_tokens}
            tables[sweep].append(entry)
            log(f"scaling: {sweep}: adapters={adapters} batch={batch} len={seq_len}: {seconds:.2f} s/step, "
                f"{tokens / seconds:.0f} tok/s")
    close_quietly(service)
    return {"rows": [], "details": {**cfg, "lora_rank": RANK}, "tables": tables}


def format_tables(tables: dict[str, list[dict]]) -> str:
    lines = [f"{'sweep':<16} {'adapters':>8} {'batch':>5} {'len':>5} {'tok/step':>8} {'s/step':>8} {'tok/s':>7} "
             f"{'x first':>7} {'linear':>6}"]
    for sweep, entries in tables.items():
        for e in entries:
            lines.append(f"{sweep:<16} {e['adapters']:>8} {e['batch']:>5} {e['seq_len']:>5} {e['tokens_per_step']:>8} "
                         f"{e['step_s']:>8.2f} {e['tokens_per_s']:>7.0f} {e['vs_first']:>7.2f} {e['linear']:>6.1f}")
    return "\n".join(lines)
