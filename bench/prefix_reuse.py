"""10. Prompt-prefix reuse: the same RL-shaped loads with the sampler's prefix cache on
(the default) and off (`--prefix-cache-mb 0`), two servers taking turns.

- Multi-turn rollout: a conversation of TURNS turns; each turn sends the whole conversation
  so far (a system prompt, then each turn's user message and the model's reply) and appends
  the greedy reply and the next user message. With reuse, each turn computes only what the
  last turn added.
- Group: GROUP requests of one long prompt sent at once, one sample each (an RL group sent
  as separate requests). With reuse, the prompt is computed once.

Both servers see the same prompts (fresh ones every round, so nothing is cached from an
earlier round) and give the same greedy tokens. Reported: wall time with reuse against
without, and the prompt tokens computed (each response's prompt length minus its
prompt_cache_hit_tokens) against all prompt tokens sent.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import API_KEY, Context, Target, close_quietly, log, one_compute_thread, random_tokens, row, settle


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"turns": 3, "system": 64, "user": 16, "reply": 4, "group": 4, "group_prompt": 96, "group_tokens": 4,
                "rounds": 1}
    return {"turns": 8, "system": 512, "user": 64, "reply": 32, "group": 16, "group_prompt": 1024, "group_tokens": 16,
            "rounds": 2}


def rollout(client, rng: np.random.Generator, vocab: int, cfg: dict) -> tuple[float, int, int]:
    """One multi-turn conversation: (seconds, prompt tokens sent, prompt tokens computed)."""
    from tinker import types

    params = types.SamplingParams(max_tokens=cfg["reply"], temperature=0.0, stop=[])
    conversation = random_tokens(rng, vocab, cfg["system"])
    sent = computed = 0
    start = time.perf_counter()
    for _ in range(cfg["turns"]):
        conversation += random_tokens(rng, vocab, cfg["user"])
        response = client.sample(types.ModelInput.from_ints(conversation), 1, params).result()
        sent += len(conversation)
        computed += len(conversation) - response.prompt_cache_hit_tokens
        conversation += response.sequences[0].tokens
    return time.perf_counter() - start, sent, computed


def group(client, prompt: list[int], cfg: dict) -> tuple[float, int, int]:
    """GROUP requests of one prompt at once: (seconds, prompt tokens sent, prompt tokens computed)."""
    from tinker import types

    params = [types.SamplingParams(max_tokens=cfg["group_tokens"], temperature=1.0, seed=i, stop=[]) for i in range(cfg["group"])]
    start = time.perf_counter()
    futures = [client.sample(types.ModelInput.from_ints(prompt), 1, p) for p in params]
    responses = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    hits = sum(r.prompt_cache_hit_tokens for r in responses)
    return seconds, len(prompt) * len(responses), len(prompt) * len(responses) - hits


def run(ctx: Context, smoke: bool) -> dict:
    import tinker

    from tinkerd_testing import Server

    cfg = sizes(smoke)
    vocab = ctx.shape.vocab
    # Two servers of their own, alike but for the option, each on one compute thread: with two
    # OpenMP threads on a busy host, a lone row's decode steps spin-wait (bench/common.py) and
    # their noise drowned the prefill a turn saves (a first run: about 30 s a turn on either side).
    log("prefix_reuse: starting tinkerd with the prefix cache and one with --prefix-cache-mb 0")
    with one_compute_thread():
        servers = {"reuse": Server(ctx.model_dir, ctx.work / "data-prefix-cache"),
                   "plain": Server(ctx.model_dir, ctx.work / "data-no-prefix-cache", ["--prefix-cache-mb", "0"])}
        try:
            for server in servers.values():
                server.start(timeout=300)
        except BaseException:
            for server in servers.values():
                server.stop()
            raise
    try:
        services = {side: tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) for side, server in servers.items()}
        sides = {side: service.create_sampling_client(base_model=ctx.model_name).result() for side, service in services.items()}
        warm = np.random.default_rng(99)
        for client in sides.values():  # first requests pay for loading and warming up, on both sides alike
            rollout(client, warm, vocab, {**cfg, "turns": 2})
            settle()
        totals = {f"{load} {side}": [0.0, 0, 0] for load in ("rollout", "group") for side in sides}
        for round_index in range(cfg["rounds"]):
            for side, client in sides.items():
                rng = np.random.default_rng(1000 + round_index)  # the same prompts for both sides
                for total, (seconds, sent, computed) in (
                        (totals[f"rollout {side}"], rollout(client, rng, vocab, cfg)),
                        (totals[f"group {side}"], group(client, random_tokens(rng, vocab, cfg["group_prompt"]), cfg))):
                    total[0] += seconds
                    total[1] += sent
                    total[2] += computed
                settle()
            log(f"prefix_reuse: round {round_index + 1}: " + ", ".join(
                f"{key} {s:.2f} s, {c}/{n} prompt tokens computed" for key, (s, n, c) in totals.items()))
        for service in services.values():
            close_quietly(service)
    finally:
        for server in servers.values():
            server.stop()

    rows = []
    for load, label in (("rollout", f"{cfg['turns']}-turn rollout"), ("group", f"{cfg['group']} requests of one prompt")):
        (on_s, sent, on_computed), (off_s, _, off_computed) = totals[f"{load} reuse"], totals[f"{load} plain"]
        rows.append(row(f"{label}: wall time", on_s / cfg["rounds"], "s", off_s / cfg["rounds"], Target("<", 0.8),
                        baseline_name="--prefix-cache-mb 0"))
        rows.append(row(f"{label}: prompt tokens computed", on_computed / cfg["rounds"], "tok", off_computed / cfg["rounds"],
                        baseline_name="--prefix-cache-mb 0 (all sent)"))
    details = {**cfg, "seconds_sent_computed": totals}
    return {"rows": rows, "details": details}

