"""Qwen3-8B- and Qwen3-30B-A3B-shaped models with random weights, in the engine, in-process.

    python -m bench.gpu_families [--only qwen3-8b qwen3-30b-a3b] [--device cuda] [--smoke]

For a GPU machine that has none of the real weights: the model is built from its config's
shapes with random bf16 weights made on the device (no file, no host copy), so the figures
are the engine's real speed at those shapes, and the outputs are meaningless. Measures, per
model: LoRA (rank 16, attention + MLP or every expert) training tokens/s at 16 x 512
(forward_backward + optim_step), and decode tokens/s of 1 and of 64 concurrent requests
(32-token prompts, 128 new tokens, the base model). `--smoke` runs tiny versions of the same
shapes on any device (it proves the script; its figures mean nothing). Writes
bench/results/gpu_families-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tinkerd.engine.client import InProcessEngine

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
}
SMOKE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
         "num_experts_per_tok": 2}


def random_weights(hf_config: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights of every tensor the config implies, made on the device in its dtype."""
    from tinkerd.engine.model import ModelConfig

    cfg = ModelConfig.from_hf(hf_config)
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * 0.02

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": ones(h), "lm_head.weight": rnd(cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        w |= {p + "self_attn.q_proj.weight": rnd(q_out, h), p + "self_attn.k_proj.weight": rnd(kv_out, h),
              p + "self_attn.v_proj.weight": rnd(kv_out, h), p + "self_attn.o_proj.weight": rnd(h, q_out),
              p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h)}
        if cfg.qk_norm:
            w |= {p + "self_attn.q_norm.weight": ones(cfg.head_dim), p + "self_attn.k_norm.weight": ones(cfg.head_dim)}
        if cfg.is_moe_layer(layer):
            moe = cfg.moe
            w |= {p + "mlp.gate.weight": rnd(moe.num_experts, h),
                  p + "mlp.experts.gate_up_proj": rnd(moe.num_experts, 2 * moe.intermediate_size, h),
                  p + "mlp.experts.down_proj": rnd(moe.num_experts, h, moe.intermediate_size)}
        else:
            i = cfg.intermediate_size
            w |= {p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i)}
    return w


class RandomWeightsEngine(InProcessEngine):
    """The engine, its model built from a config with random weights; the tokenizer (used only
    to detokenize) comes from `tokenizer_dir`."""

    def __init__(self, name: str, hf_config: dict, tokenizer_dir: Path, device: str | None):
        self.hf_config = hf_config
        super().__init__(name, tokenizer_dir, device=device)

    def _load_model(self, device, dtype):  # noqa: ANN001, ANN202 - the engine's hook
        from tinkerd.engine.model import LlamaModel, ModelConfig

        return LlamaModel(ModelConfig.from_hf(self.hf_config), random_weights(self.hf_config, device, dtype))


def sync(engine: InProcessEngine) -> None:
    if engine.model.device.type == "cuda":
        engine.run_on_engine_thread(torch.cuda.synchronize).result()


def measure(name: str, hf_config: dict, tokenizer_dir: Path, device: str | None, sizes: dict) -> dict:
    from tinkerd.types import AdamParams, Datum, ForwardBackwardCall, LoraSpec, SampleRequest, SamplingParams

    start = time.perf_counter()
    engine = RandomWeightsEngine(name, hf_config, tokenizer_dir, device)
    sync(engine)
    result: dict = {"build_s": time.perf_counter() - start, "dtype": str(engine.model.dtype), "device": str(engine.model.device)}
    if engine.model.device.type == "cuda":
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    rng = np.random.default_rng(0)
    vocab = hf_config["vocab_size"]
    try:
        engine.create_adapter("bench", LoraSpec(rank=16, seed=0, train_unembed=False)).result()
        batch, seq = sizes["train_batch"], sizes["train_len"]
        datums = []
        for _ in range(batch):
            seq_tokens = rng.integers(3, vocab, size=seq + 1)
            datums.append(Datum(tokens=seq_tokens[:-1].astype(np.int64), inputs={
                "target_tokens": seq_tokens[1:].astype(np.int64), "weights": np.ones(seq, np.float32)}))

        def train_step() -> None:
            fb = engine.forward_backward(ForwardBackwardCall("bench", datums, "cross_entropy", {}, False))
            engine.optim_step("bench", AdamParams(learning_rate=1e-5)).result()
            fb.result()

        train_step()  # warm-up
        sync(engine)
        start = time.perf_counter()
        for _ in range(sizes["train_steps"]):
            train_step()
        sync(engine)
        result["train_tokens_per_s"] = batch * seq * sizes["train_steps"] / (time.perf_counter() - start)
        if engine.model.device.type == "cuda":
            result["peak_gib_after_training"] = torch.cuda.max_memory_allocated() / 2**30

        for rows in (1, sizes["decode_rows"]):
            requests = [SampleRequest(prompt=[int(t) for t in rng.integers(3, vocab, size=32)], num_samples=1,
                                      params=SamplingParams(max_tokens=sizes["new_tokens"], seed=i, ignore_eos=True))
                        for i in range(rows)]
            engine.sample(requests[0]).result()  # warm-up
            start = time.perf_counter()
            tokens = sum(len(f.result().sequences[0].tokens) for f in [engine.sample(r) for r in requests])
            result[f"decode_tokens_per_s_x{rows}"] = tokens / (time.perf_counter() - start)
    finally:
        engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_families", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--tokenizer-dir", default=None, help="a model dir with tokenizer files (default: the default model)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: proves the script, figures mean nothing")
    args = ap.parse_args(argv)
    if args.tokenizer_dir:
        tokenizer_dir = Path(args.tokenizer_dir)
    else:
        from bench.common import CACHE, MODEL_NAME
        from tinkerd.model_store import resolve_model

        tokenizer_dir = resolve_model(MODEL_NAME, CACHE).path
    sizes = {"train_batch": 16, "train_len": 512, "train_steps": 3, "decode_rows": 64, "new_tokens": 128}
    if args.smoke:
        sizes = {"train_batch": 2, "train_len": 16, "train_steps": 1, "decode_rows": 4, "new_tokens": 4}
    results = {}
    for name in args.only:
        config = {**SHAPES[name], **(SMOKE if args.smoke else {})}
        results[name] = measure(name, config, tokenizer_dir, args.device, sizes)
        print(name, json.dumps(results[name], indent=1), flush=True)
    device = next(iter(results.values()))["device"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out = RESULTS / f"gpu_families-{device.split(':')[0]}{'-smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.node(), "gpu": gpu,
                               "torch": torch.__version__, "sizes": sizes, "smoke": args.smoke, "models": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
