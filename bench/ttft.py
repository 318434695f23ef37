"""Time to first token for a checkpoint saved a moment ago, through the OpenAI front door.

    python -m bench.ttft [--runs 5] [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--rank 32]

Starts a real `tinkerd serve` subprocess, trains a LoRA briefly with the tinker SDK, and
each run: one training step, `save_weights_for_sampler`, then a streamed
`/oai/api/v1/completions` request (openai SDK) for the new path. TTFT is measured from the
moment the save result is in hand to the first streamed text. Baselines from the same run:
the base model with no adapter, the same checkpoint again (adapter cached), and every
checkpoint again after a server restart (adapter read from disk on first use).

Prints a table (median / min / max over runs, and the ratio to the base-model TTFT) and
writes JSON to bench/results/ttft.json. Target on the 2-core CPU box: median under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, REPO, Server  # the test suite's tinkerd process helper

PROMPT = "The capital of France is"


def first_token_seconds(client, model: str, max_tokens: int) -> tuple[float, float, str]:
    """(seconds to the first streamed text, seconds to the end, text) of one streamed completion."""
    start = time.perf_counter()
    first = None
    text = ""
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = time.perf_counter() - start
            text += chunk.choices[0].text
    total = time.perf_counter() - start
    return (first if first is not None else total), total, text


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="base model name, hub id or HF directory")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (the tinker SDK's default is 32)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ttft.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HOME", str(CACHE / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    sys.path.insert(0, str(REPO / "src"))
    import tinker
    from openai import OpenAI
    from tinker import types
    from transformers import AutoTokenizer

    from tinkerd.model_store import resolve_model, seed_hf_cache

    source = resolve_model(args.model, CACHE)  # imported once, shared with the test suite
    seed_hf_cache(source)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )

    work = Path(tempfile.mkdtemp(prefix="tinkerd-ttft-"))
    data_dir = work / "data"
    server = Server(source.path, data_dir).start()
    results: dict[str, list[float]] = {"fresh_checkpoint": [], "base_model": [], "cached_checkpoint": [], "after_restart": []}
    save_seconds: list[float] = []
    paths: list[str] = []
    try:
        service = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench")
        training = service.create_lora_training_client(base_model=source.name, rank=args.rank)
        client = OpenAI(base_url=server.base_url + "/oai/api/v1", api_key="tml-bench", max_retries=0)
        first_token_seconds(client, source.name, 2)  # warm-up: first-request costs are not what we measure
        for run in range(args.runs):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            begin = time.perf_counter()
            path = training.save_weights_for_sampler(f"ttft-{run:03d}").result().path
            save_seconds.append(time.perf_counter() - begin)
            paths.append(path)
            ttft, _, _ = first_token_seconds(client, path, args.max_tokens)  # clock starts with the save in hand
            results["fresh_checkpoint"].append(ttft)
            results["cached_checkpoint"].append(first_token_seconds(client, path, args.max_tokens)[0])
            results["base_model"].append(first_token_seconds(client, source.name, args.max_tokens)[0])
            print(f"run {run}: fresh {ttft * 1000:.0f} ms", flush=True)
        server.stop()
        server = Server(source.path, data_dir).start()
        client = OpenAI(base_url=server.base_url + "/oai/api/v1", api_key="tml-bench", max_retries=0)
        first_token_seconds(client, source.name, 2)
        for path in paths:
            results["after_restart"].append(first_token_seconds(client, path, args.max_tokens)[0])
    finally:
        server.stop()

    base = statistics.median(results["base_model"])
    table = {name: {**summary(values), "ratio_to_base_model": statistics.median(values) / base} for name, values in results.items()}
    print()
    print(f"time to first streamed token, {args.runs} runs, {source.name}, LoRA rank {args.rank}, prompt {PROMPT!r}")
    print(f"{'scenario':<20} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'x base':>7}")
    for name, row in table.items():
        print(f"{name:<20} {row['median_s'] * 1000:>10.0f} {row['min_s'] * 1000:>8.0f} {row['max_s'] * 1000:>8.0f} "
              f"{row['ratio_to_base_model']:>7.2f}")
    print(f"save_weights_for_sampler: median {statistics.median(save_seconds) * 1000:.0f} ms")
    verdict = "PASS" if table["fresh_checkpoint"]["median_s"] < 1.0 else "MISS"
    print(f"target: fresh checkpoint median < 1 s -> {verdict}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "ttft", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "model": source.name, "rank": args.rank, "runs": args.runs, "max_tokens": args.max_tokens, "prompt": PROMPT,
        "table": table, "raw_s": results, "save_weights_for_sampler_s": save_seconds, "target_met": verdict == "PASS",
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
