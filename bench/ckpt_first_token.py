"""5. Checkpoint to first token: how soon a just-saved sampler checkpoint answers.

Each run: one training step (LoRA rank 32, the SDK default), then
`save_weights_for_sampler`. The clock starts when its result (the tinker:// path) is in
hand and stops at the first sampled token of that new checkpoint:
  * SDK: `create_sampling_client(model_path=path)` + `sample(max_tokens=1)` until the
    result arrives (one token = the first token);
  * OpenAI: a second fresh checkpoint (another save) and a streamed `/oai/api/v1/completions`
    request for it, until the first streamed text chunk.
References measured in the same runs (no target): the SDK sampling a checkpoint it has
sampled before, and the base model, with the same prompt; and the save itself.
"""

from __future__ import annotations

import time

from bench.common import API_KEY, Context, Target, close_quietly, log, median, row
from bench.train_throughput import make_sequences, sdk_datums, sdk_step

RANK = 32
PROMPT = "The capital of France is"


def sizes(smoke: bool) -> dict:
    return {"runs": 2} if smoke else {"runs": 8}


def run(ctx: Context, smoke: bool) -> dict:
    from openai import OpenAI
    from tinker import types

    cfg = sizes(smoke)
    service = ctx.service_client()
    training = service.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=0).result()
    datums = sdk_datums(make_sequences(ctx, 1, 32, seed=11))
    prompt = types.ModelInput.from_ints(ctx.tokenizer.encode(PROMPT))
    one_token = types.SamplingParams(max_tokens=1, temperature=0.0)
    oai = OpenAI(base_url=ctx.server().base_url + "/oai/api/v1", api_key=API_KEY, max_retries=0)
    base = service.create_sampling_client(base_model=ctx.model_name).result()

    def sdk_first_token(sampler) -> float:
        start = time.perf_counter()
        sampler.sample(prompt, 1, one_token).result()
        return time.perf_counter() - start

    def oai_first_token(model: str) -> float:
        start = time.perf_counter()
        stream = oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
        elapsed = None
        for chunk in stream:
            if elapsed is None and chunk.choices and chunk.choices[0].text:
                elapsed = time.perf_counter() - start
        return elapsed if elapsed is not None else time.perf_counter() - start

    log(f"ckpt_first_token: {cfg['runs']} runs; warm-up")
    sdk_step(training, datums)
    warm = training.save_weights_for_sampler("first-token-warmup").result().path
    sdk_first_token(service.create_sampling_client(model_path=warm).result())
    oai_first_token(warm)
    sdk_first_token(base)

    results: dict[str, list[float]] = {"sdk_fresh": [], "openai_fresh": [], "sdk_cached": [], "sdk_base": [], "save": []}
    for run_index in range(cfg["runs"]):
        sdk_step(training, datums)
        start = time.perf_counter()
        path = training.save_weights_for_sampler(f"first-token-{run_index:03d}").result().path
        saved = time.perf_counter()
        results["save"].append(saved - start)
        sampler = service.create_sampling_client(model_path=path).result()
        sampler.sample(prompt, 1, one_token).result()
        results["sdk_fresh"].append(time.perf_counter() - saved)

        path2 = training.save_weights_for_sampler(f"first-token-{run_index:03d}-oai").result().path
        results["openai_fresh"].append(oai_first_token(path2))  # the clock starts with the save in hand
        results["sdk_cached"].append(sdk_first_token(sampler))
        results["sdk_base"].append(sdk_first_token(base))
        log(f"ckpt_first_token: run {run_index + 1}: sdk {results['sdk_fresh'][-1] * 1000:.0f} ms, "
            f"openai {results['openai_fresh'][-1] * 1000:.0f} ms")
    close_quietly(service)

    med = {key: median(values) for key, values in results.items()}
    rows = [
        row("ckpt -> first token, SDK (median)", med["sdk_fresh"], "s", med["sdk_base"], Target("<", 0.5, on="value"),
            baseline_name="base model, SDK"),
        row("ckpt -> first token, OpenAI stream (median)", med["openai_fresh"], "s", med["sdk_base"], Target("<", 0.5, on="value"),
            baseline_name="base model, SDK"),
        row("same ckpt again, SDK (median)", med["sdk_cached"], "s", med["sdk_base"], baseline_name="base model, SDK"),
        row("save_weights_for_sampler (median)", med["save"], "s"),
    ]
    details = {**cfg, "lora_rank": RANK, "prompt": PROMPT, "seconds": results, "median_s": med,
               "max_s": {key: max(values) for key, values in results.items()}}
    return {"rows": rows, "details": details}
