"""Engine-level smoke and throughput check, in-process (no server): proves a device path.

    python -m bench.engine_smoke --model-dir DIR [--device cuda] [--random-init]

`--random-init` writes random weights for the config in DIR when it has none (a GPU
machine that cannot receive the 540 MB weights still exercises every kernel and gives
real throughput figures; output quality is meaningless then). Prints a table and writes
JSON to bench/results/engine_smoke-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def random_weights(model_dir: Path) -> None:
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).contiguous()

    w = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rnd(heads * d, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kv * d, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kv * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, heads * d)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(w, str(model_dir / "model.safetensors"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--sample-batch", type=int, default=32)
    ap.add_argument("--sample-tokens", type=int, default=64)
    args = ap.parse_args()

    from tinkerd.engine.client import InProcessEngine
    from tinkerd.types import AdamParams, AdapterRef, Datum, ForwardBackwardCall, LoraSpec, SampleRequest, SamplingParams

    model_dir = Path(args.model_dir)
    if args.random_init and not list(model_dir.glob("*.safetensors")):
        random_weights(model_dir)
    t0 = time.time()
    engine = InProcessEngine("bench", model_dir, device=args.device)
    load_s = time.time() - t0
    device = engine.model.device
    vocab_size = engine.info.vocab_size
    results: dict = {"device": str(device), "dtype": str(engine.model.dtype), "load_s": load_s, "machine": platform.node()}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)

    def forward_backward(datums: list, forward_only: bool = False):
        return engine.forward_backward(ForwardBackwardCall("a", datums, "cross_entropy", {}, forward_only)).result()

    # Correctness: a repeated sequence is memorised (loss falls), decode agrees with a full pass.
    engine.create_adapter("a", LoraSpec(rank=16, seed=0)).result()
    rng = np.random.default_rng(0)
    seq = rng.integers(3, vocab_size, size=65)
    datum = Datum(tokens=seq[:-1], inputs={"target_tokens": seq[1:], "weights": np.ones(64, np.float32)})
    losses = []
    for _ in range(15):
        out = forward_backward([datum])
        engine.optim_step("a", AdamParams(learning_rate=1e-2)).result()
        losses.append(out.metrics["loss:sum"] / 64)
    results["memorise_loss_first_last"] = [losses[0], losses[-1]]
    save_dir = Path("/tmp/engine_smoke_ckpt")
    engine.save_adapter("a", str(save_dir), True, "ckpt-a").result()

    prompt = seq[:16].tolist()
    res = engine.sample(SampleRequest(prompt=prompt, num_samples=2, params=SamplingParams(max_tokens=24, temperature=1.0, seed=1),
                                      adapter=AdapterRef("ckpt-a", str(save_dir)))).result()
    sampled = res.sequences[0]
    full = np.array(prompt + sampled.tokens)
    fwd = forward_backward([Datum(tokens=full[:-1], inputs={"target_tokens": full[1:], "weights": np.zeros(len(full) - 1, np.float32)})],
                           forward_only=True)
    n = len(sampled.tokens)
    gap = float(np.max(np.abs(fwd.outputs[0]["logprobs"][-n:] - np.array(sampled.logprobs))))
    results["sampled_vs_forward_logprob_max_abs_diff"] = gap
    again = engine.sample(SampleRequest(prompt=prompt, num_samples=2, params=SamplingParams(max_tokens=24, temperature=1.0, seed=1),
                                        adapter=AdapterRef("ckpt-a", str(save_dir)))).result()
    results["seed_deterministic"] = [s.tokens for s in again.sequences] == [s.tokens for s in res.sequences]

    # Throughput: training tokens/s (fwd/bwd + step).
    data = [Datum(tokens=rng.integers(3, vocab_size, args.train_len), inputs={
        "target_tokens": rng.integers(3, vocab_size, args.train_len), "weights": np.ones(args.train_len, np.float32)})
        for _ in range(args.train_batch)]
    forward_backward(data)
    engine.optim_step("a", AdamParams()).result()
    sync(device)
    t = time.time()
    steps = 3
    for _ in range(steps):
        forward_backward(data)
        engine.optim_step("a", AdamParams()).result()
    sync(device)
    results["train_tokens_per_s"] = steps * args.train_batch * args.train_len / (time.time() - t)

    # Sampling: one stream, then a concurrent batch.
    def sample_many(k: int, tokens: int) -> float:
        reqs = [SampleRequest(prompt=rng.integers(3, vocab_size, 32).tolist(), num_samples=1,
                              params=SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True)) for i in range(k)]
        t = time.time()
        futures = [engine.sample(r) for r in reqs]
        total = sum(len(f.result().sequences[0].tokens) for f in futures)
        return total / (time.time() - t)

    sample_many(2, 8)
    results["sample_single_tokens_per_s"] = sample_many(1, args.sample_tokens)
    results["sample_batch_tokens_per_s"] = sample_many(args.sample_batch, args.sample_tokens)
    engine.shutdown()

    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"engine_smoke-{device.type}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
