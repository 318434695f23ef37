"""8. Fair sharing: one user's lone sample request while another user floods the server.

User A (its own API key) sends F samples of 64 tokens at once; while they run, user B (another
key) sends one 8-token request at a time, R of them in a row. Their latency is compared with
the same request on an idle server (median of R). The server should keep B close to its idle
latency: target <= 2x. Also reported: how long A's flood took, against the same flood alone
(what fairness costs the heavy user).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.common import Context, Target, close_quietly, log, random_tokens, row, settle


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"flood": 8, "flood_tokens": 8, "lone_tokens": 4, "repeats": 2}
    return {"flood": 200, "flood_tokens": 64, "lone_tokens": 8, "repeats": 5}


def run(ctx: Context, smoke: bool) -> dict:
    import tinker
    from tinker import types

    cfg = sizes(smoke)
    server = ctx.server()
    heavy = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench-user-a")
    light = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench-user-b")
    flood_client = heavy.create_sampling_client(base_model=ctx.model_name).result()
    lone_client = light.create_sampling_client(base_model=ctx.model_name).result()
    rng = np.random.default_rng(7)
    flood_prompts = [random_tokens(rng, ctx.shape.vocab, 32) for _ in range(cfg["flood"])]
    lone_prompt = random_tokens(rng, ctx.shape.vocab, 32)
    lone_params = types.SamplingParams(max_tokens=cfg["lone_tokens"], temperature=1.0, seed=1)

    def lone() -> float:
        start = time.perf_counter()
        lone_client.sample(types.ModelInput.from_ints(lone_prompt), 1, lone_params).result()
        return time.perf_counter() - start

    def flood() -> list:
        params = types.SamplingParams(max_tokens=cfg["flood_tokens"], temperature=1.0, seed=2)
        return [flood_client.sample(types.ModelInput.from_ints(p), 1, params) for p in flood_prompts]

    lone()  # warm-up
    idle = [lone() for _ in range(cfg["repeats"])]
    settle()
    start = time.perf_counter()
    for future in flood():
        future.result()
    flood_alone_s = time.perf_counter() - start
    settle()

    start = time.perf_counter()
    futures = flood()
    busy = [lone() for _ in range(cfg["repeats"])]
    for future in futures:
        future.result()
    flood_shared_s = time.perf_counter() - start
    close_quietly(heavy)
    close_quietly(light)
    idle_s, busy_s = statistics.median(idle), statistics.median(busy)
    log(f"fairness: lone request idle {idle_s * 1000:.0f} ms, beside the flood {busy_s * 1000:.0f} ms "
        f"(worst {max(busy) * 1000:.0f} ms); flood {flood_alone_s:.1f} s alone, {flood_shared_s:.1f} s shared")
    return {
        "rows": [
            row(f"lone {cfg['lone_tokens']}-token request beside {cfg['flood']} x {cfg['flood_tokens']} (median)", busy_s, "s",
                idle_s, Target("<", 2.0), baseline_name="same request, idle server"),
            row("  worst of them", max(busy), "s", idle_s, baseline_name="same request, idle server"),
            row("the flood, sharing with the lone user", flood_shared_s, "s", flood_alone_s, baseline_name="the flood alone"),
        ],
        "details": {**cfg, "idle_s": idle, "busy_s": busy, "flood_alone_s": flood_alone_s, "flood_shared_s": flood_shared_s},
    }
