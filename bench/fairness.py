"""8. Fair sharing: one user's lone sample request while another user floods the server.

User A (its own API key) sends F samples of 64 tokens at once; while they run, user B (another
key, in a process of its own, as another user's client would be: one process's SDK clients
share its connections) sends one 8-token request at a time, R of them in a row. Their latency is compared with
the same request on an idle server (median of R). The server should keep B close to its idle
latency: target <= 2x. Also reported: how long A's flood took, against the same flood alone
(what fairness costs the heavy user).

The same lone request is then timed while user A trains instead: forward_backward calls of
a large batch (many of the engine's training passes each) queued back to back. The engine
decodes between the passes; B waits for at most the pass running when it arrives.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.common import Context, Target, close_quietly, log, random_tokens, row, settle


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"flood": 8, "flood_tokens": 8, "lone_tokens": 4, "repeats": 2, "train_batch": 4, "train_len": 32, "train_calls": 2}
    return {"flood": 200, "flood_tokens": 64, "lone_tokens": 8, "repeats": 5, "train_batch": 64, "train_len": 128, "train_calls": 3}


_LONE_CLIENT = None  # user B's SamplingClient, in B's process


def lone_latencies(base_url: str, model_name: str, prompt: list[int], max_tokens: int, repeats: int,
                   warm_up: bool = True) -> list[float]:
    """In user B's process: seconds for each of `repeats` requests in a row (after a warm-up,
    which B's first call of the run needs and the later ones must not have: a warm-up sent
    beside the other user's work would take the wait the timed requests are there to measure)."""
    global _LONE_CLIENT
    import tinker
    from tinker import types

    if _LONE_CLIENT is None:
        service = tinker.ServiceClient(base_url=base_url, api_key="tml-bench-user-b")
        _LONE_CLIENT = service.create_sampling_client(base_model=model_name).result()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)
    if warm_up:
        _LONE_CLIENT.sample(types.ModelInput.from_ints(prompt), 1, params).result()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _LONE_CLIENT.sample(types.ModelInput.from_ints(prompt), 1, params).result()
        times.append(time.perf_counter() - start)
    return times


def training_datum(tokens: list[int]):
    from tinker import types

    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def run(ctx: Context, smoke: bool) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import tinker
    from tinker import types

    cfg = sizes(smoke)
    server = ctx.server()
    heavy = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench-user-a")
    flood_client = heavy.create_sampling_client(base_model=ctx.model_name).result()
    rng = np.random.default_rng(7)
    flood_prompts = [random_tokens(rng, ctx.shape.vocab, 32) for _ in range(cfg["flood"])]
    lone_args = (server.base_url, ctx.model_name, random_tokens(rng, ctx.shape.vocab, 32), cfg["lone_tokens"], cfg["repeats"])

    def flood() -> list:
        params = types.SamplingParams(max_tokens=cfg["flood_tokens"], temperature=1.0, seed=2)
        return [flood_client.sample(types.ModelInput.from_ints(p), 1, params) for p in flood_prompts]

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as user_b:
        idle = user_b.submit(lone_latencies, *lone_args).result()
        settle()
        start = time.perf_counter()
        for future in flood():
            future.result()
        flood_alone_s = time.perf_counter() - start
        settle()

        start = time.perf_counter()
        futures = flood()
        busy = user_b.submit(lone_latencies, *lone_args, False).result()
        flood_running = not all(f.future().done() for f in futures)  # B's requests were all timed beside it
        for future in futures:
            future.result()
        flood_shared_s = time.perf_counter() - start
        settle()

        trainer = heavy.create_lora_training_client(base_model=ctx.model_name, rank=8).result()
        batch = [training_datum(random_tokens(rng, ctx.shape.vocab, cfg["train_len"])) for _ in range(cfg["train_batch"])]

        def train_calls() -> list:
            return [trainer.forward_backward(batch, "cross_entropy") for _ in range(cfg["train_calls"])]

        for future in train_calls():  # warm-up
            future.result()
        start = time.perf_counter()
        for future in train_calls():
            future.result()
        training_alone_s = time.perf_counter() - start
        settle()
        start = time.perf_counter()
        futures = train_calls()
        beside_training = user_b.submit(lone_latencies, *lone_args, False).result()
        training_running = not all(f.future().done() for f in futures)
        for future in futures:
            future.result()
        training_shared_s = time.perf_counter() - start
    close_quietly(heavy)
    idle_s, busy_s = statistics.median(idle), statistics.median(busy)
    log(f"fairness: lone request idle {idle_s * 1000:.0f} ms, beside the flood {busy_s * 1000:.0f} ms "
        f"(worst {max(busy) * 1000:.0f} ms); flood {flood_alone_s:.1f} s alone, {flood_shared_s:.1f} s shared")
    log(f"fairness: the other user's work was still running when B's last request ended: flood {flood_running}, "
        f"training {training_running}")
    log(f"fairness: lone request beside training {statistics.median(beside_training) * 1000:.0f} ms "
        f"(worst {max(beside_training) * 1000:.0f} ms); training {training_alone_s:.1f} s alone, {training_shared_s:.1f} s shared")
    return {
        "rows": [
            row(f"lone {cfg['lone_tokens']}-token request beside {cfg['flood']} x {cfg['flood_tokens']} (median)", busy_s, "s",
                idle_s, Target("<", 2.0), baseline_name="same request, idle server"),
            row("  worst of them", max(busy), "s", idle_s, baseline_name="same request, idle server"),
            row("the flood, sharing with the lone user", flood_shared_s, "s", flood_alone_s, baseline_name="the flood alone"),
            row(f"lone request beside {cfg['train_calls']} forward_backward of {cfg['train_batch']} x {cfg['train_len']} (median)",
                statistics.median(beside_training), "s", idle_s, baseline_name="same request, idle server"),
            row("  worst of them", max(beside_training), "s", idle_s, baseline_name="same request, idle server"),
            row("the training, sharing with the lone user", training_shared_s, "s", training_alone_s,
                baseline_name="the training alone"),
        ],
        "details": {**cfg, "idle_s": idle, "busy_s": busy, "flood_alone_s": flood_alone_s, "flood_shared_s": flood_shared_s,
                    "beside_training_s": beside_training, "training_alone_s": training_alone_s,
                    "training_shared_s": training_shared_s, "flood_running_at_end": flood_running,
                    "training_running_at_end": training_running},
    }
