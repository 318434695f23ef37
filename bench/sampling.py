"""3. Sampling throughput: tinkerd's SamplingClient against transformers `generate`.

Batch: N concurrent SDK requests (distinct prompts of P tokens, one sample each, T new
tokens, temperature 1, `stop=[]` so EOS does not end a row early) against one
`model.generate` call on the same N prompts (left padding, do_sample, temperature 1, no
top-k/top-p, min_new_tokens = max_new_tokens = T so it too never stops early).
Single: one request against generate with batch 1. The base model, no adapter, fp32.
Aggregate tokens/s = generated tokens / wall time from the first submission to the last
result. Both sides warm up first and then take turns, in rounds.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from bench.common import Context, Target, close_quietly, load_hf_model, log, random_tokens, row, settle


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"requests": 4, "prompt_len": 8, "new_tokens": 8, "rounds": 1}
    return {"requests": 32, "prompt_len": 32, "new_tokens": 64, "rounds": 2}


def make_prompts(ctx: Context, count: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [random_tokens(rng, ctx.shape.vocab, length) for _ in range(count)]


def sdk_sample_concurrently(clients: list, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> tuple[int, float]:
    """Prompt i goes to clients[i % len(clients)], all submitted at once; (tokens, seconds)."""
    from tinker import types

    params = [types.SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed + i, stop=[]) for i in range(len(prompts))]
    start = time.perf_counter()
    futures = [clients[i % len(clients)].sample(types.ModelInput.from_ints(p), 1, params[i]) for i, p in enumerate(prompts)]
    tokens = sum(len(f.result().sequences[0].tokens) for f in futures)
    return tokens, time.perf_counter() - start


def engine_sample_concurrently(engine, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> tuple[int, float]:
    """Reference: the same load straight into tinkerd's engine in this process (no HTTP, no SDK)."""
    from tinkerd.types import SampleRequest, SamplingParams

    requests = [SampleRequest(prompt=p, num_samples=1, params=SamplingParams(max_tokens=new_tokens, temperature=1.0,
                                                                          seed=seed + i, ignore_eos=True))
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    futures = [engine.sample(r) for r in requests]
    tokens = sum(len(f.result().sequences[0].tokens) for f in futures)
    return tokens, time.perf_counter() - start


class Generate:
    """The baseline: transformers `generate` on a left-padded batch."""

    def __init__(self, ctx: Context):
        import torch

        self.torch = torch
        self.model = load_hf_model(ctx.model_dir)
        tokenizer = ctx.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> tuple[int, float]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                      top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self.pad_id)
        elapsed = time.perf_counter() - start
        generated = (out.shape[1] - width) * out.shape[0]
        return generated, elapsed


def run(ctx: Context, smoke: bool) -> dict:
    cfg = sizes(smoke)
    n, new_tokens = cfg["requests"], cfg["new_tokens"]
    prompts = make_prompts(ctx, n, cfg["prompt_len"])
    service = ctx.service_client()
    sampler = service.create_sampling_client(base_model=ctx.model_name).result()
    log(f"sampling: {n} x {new_tokens} new tokens (prompts of {cfg['prompt_len']}); warm-up")
    engine = ctx.engine()
    generate = ctx.on_torch_thread(Generate, ctx)
    # Each side: (batch run, single run), taking turns round by round after a short warm-up each.
    sides = {
        "server": lambda p, t, seed=0: sdk_sample_concurrently([sampler], p, t, seed),
        "engine": lambda p, t, seed=0: engine_sample_concurrently(engine, p, t, seed),
        "baseline": lambda p, t, seed=0, hf=generate: ctx.on_torch_thread(hf, p, t, seed),
    }
    for side in sides.values():
        side(prompts, 4)
        side(prompts[:1], 4)
        settle()
    totals = {f"{side}_{kind}": [0, 0.0] for side in sides for kind in ("batch", "single")}
    for round_index in range(cfg["rounds"]):
        seed = 1000 * round_index
        for name, side in sides.items():
            for kind, batch in (("batch", prompts), ("single", prompts[:1])):
                tokens, seconds = side(batch, new_tokens, seed)
                totals[f"{name}_{kind}"][0] += tokens
                totals[f"{name}_{kind}"][1] += seconds
            settle()
        log(f"sampling: round {round_index + 1}: " + ", ".join(f"{k} {t / s:.0f} tok/s" for k, (t, s) in totals.items()))
    close_quietly(service)
    del generate, sides
    gc.collect()

    rate = {key: tokens / seconds for key, (tokens, seconds) in totals.items()}
    rows = [
        row(f"sample {n} concurrent x {new_tokens}", rate["server_batch"], "tok/s", rate["baseline_batch"], Target(">=", 2.0),
            baseline_name="HF generate batch"),
        row(f"sample 1 request x {new_tokens}", rate["server_single"], "tok/s", rate["baseline_single"], Target(">=", 1.5),
            baseline_name="HF generate batch 1"),
        row(f"  {n} x {new_tokens}, engine in-process (reference)", rate["engine_batch"], "tok/s", rate["baseline_batch"],
            baseline_name="HF generate batch"),
        row(f"  1 x {new_tokens}, engine in-process (reference)", rate["engine_single"], "tok/s", rate["baseline_single"],
            baseline_name="HF generate batch 1"),
    ]
    details = {**cfg, "tokens_and_seconds": totals, "tokens_per_s": rate}
    return {"rows": rows, "details": details}
