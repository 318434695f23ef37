"""4. Multi-LoRA sampling: one load spread over 8 checkpoints against the same load on one.

A training client (LoRA rank 32, the SDK's default, on attention, MLP and unembedding)
takes a step before each of 8 `save_weights_for_sampler` calls, so the 8 checkpoints
differ. The load is the sampling benchmark's: N concurrent requests x T new tokens.
"One checkpoint": every request on checkpoint 0. "Eight checkpoints": request i on
checkpoint i mod 8, so every decode step mixes 8 adapters. Reference (no target): the
same load on the base model with no adapter, which shows the cost of LoRA itself.
"""

from __future__ import annotations

from bench.common import Context, Target, close_quietly, log, row, settle
from bench.sampling import make_prompts, sdk_sample_concurrently
from bench.train_throughput import make_sequences, sdk_datums, sdk_step

RANK = 32


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"checkpoints": 2, "requests": 4, "prompt_len": 8, "new_tokens": 8, "rounds": 1}
    return {"checkpoints": 8, "requests": 32, "prompt_len": 32, "new_tokens": 64, "rounds": 2}


def run(ctx: Context, smoke: bool) -> dict:
    cfg = sizes(smoke)
    k, new_tokens = cfg["checkpoints"], cfg["new_tokens"]
    service = ctx.service_client()
    training = service.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=0).result()
    datums = sdk_datums(make_sequences(ctx, 1, 32, seed=7))
    log(f"multilora: saving {k} checkpoints (rank {RANK})")
    paths = []
    for i in range(k):
        sdk_step(training, datums, learning_rate=1e-3)
        paths.append(training.save_weights_for_sampler(f"multilora-{i}").result().path)
    samplers = [service.create_sampling_client(model_path=p).result() for p in paths]
    base = service.create_sampling_client(base_model=ctx.model_name).result()
    prompts = make_prompts(ctx, cfg["requests"], cfg["prompt_len"])
    log(f"multilora: {cfg['requests']} x {new_tokens} new tokens; warm-up")
    sdk_sample_concurrently(samplers, prompts, 4)
    sdk_sample_concurrently([base], prompts, 4)
    settle()

    totals = {key: [0, 0.0] for key in ("one", "many", "base")}
    for round_index in range(cfg["rounds"]):
        seed = 1000 * round_index
        for key, clients in (("one", samplers[:1]), ("many", samplers), ("base", [base])):
            tokens, seconds = sdk_sample_concurrently(clients, prompts, new_tokens, seed)
            totals[key][0] += tokens
            totals[key][1] += seconds
            settle()
        log(f"multilora: round {round_index + 1}: " + ", ".join(
            f"{key} {t / s:.0f} tok/s" for key, (t, s) in totals.items()))
    close_quietly(service)

    rate = {key: tokens / seconds for key, (tokens, seconds) in totals.items()}
    rows = [
        row(f"sample over {k} checkpoints", rate["many"], "tok/s", rate["one"], Target(">=", 0.8),
            baseline_name="all on 1 checkpoint"),
        row("sample on 1 checkpoint", rate["one"], "tok/s", rate["base"], baseline_name="base model, no LoRA"),
    ]
    details = {**cfg, "lora_rank": RANK, "tokens_and_seconds": totals, "tokens_per_s": rate}
    return {"rows": rows, "details": details}
