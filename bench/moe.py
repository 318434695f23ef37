"""7. A small mixture-of-experts model: tinkerd's engine against transformers (+ PEFT).

A random-weight Qwen3-MoE-shaped model (8 experts, top-2, 4 layers, hidden 256) built here
with transformers and saved to the bench's work dir. Both sides run in this process, on the
engine's one torch thread, in turns:

- training: a rank-8 LoRA on attention and on every expert's projections (PEFT trains the
  experts through `target_parameters`, one A and B per expert as tinkerd does), cross-entropy
  summed over every target token, AdamW; one step = forward_backward + optim_step;
- decode: new tokens per second of one request and of 8 concurrent ones (64 tokens each,
  the base model) against transformers `generate` with the same batch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import Context, log, row, settle, time_in_turns
from bench.train_throughput import LEARNING_RATE, RANK, PeftTrainer

VOCAB = 4096


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": 2, "seq_len": 16, "rounds": 1, "steps_per_round": 1, "new_tokens": 4, "prompt": 8, "rows": 2}
    return {"batch": 8, "seq_len": 128, "rounds": 2, "steps_per_round": 3, "new_tokens": 64, "prompt": 32, "rows": 8}


def build_model(ctx: Context) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    target = ctx.work / "moe-model"
    if (target / "config.json").exists():
        return target
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(target))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # tokens are random ids < VOCAB
        if (ctx.model_dir / name).exists():
            shutil.copyfile(ctx.model_dir / name, target / name)
    assert json.loads((target / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    return target


class PeftMoeTrainer(PeftTrainer):
    """The train_throughput baseline's loop (its `step`), on the MoE model, with PEFT's LoRA on
    attention and on the stacked experts."""

    def __init__(self, model_dir: Path, sequences: list[list[int]]):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        self.setup(get_peft_model(model, config), sequences)


class MoeGenerate:
    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def __call__(self, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
        torch = self.torch
        input_ids = torch.tensor(prompts)  # equal lengths: no padding
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0)
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0], time.perf_counter() - start


def engine_train_step(engine, adapter_id: str, datums: list) -> float:
    from tinkerd.types import AdamParams, ForwardBackwardCall

    fb = engine.forward_backward(ForwardBackwardCall(adapter_id, datums, "cross_entropy", {}, False))
    opt = engine.optim_step(adapter_id, AdamParams(learning_rate=LEARNING_RATE))
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


def engine_decode(engine, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    from tinkerd.types import SampleRequest, SamplingParams

    requests = [SampleRequest(prompt=p, num_samples=1, params=SamplingParams(max_tokens=new_tokens, seed=i, ignore_eos=True))
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    futures = [engine.sample(r) for r in requests]
    tokens = sum(len(f.result().sequences[0].tokens) for f in futures)
    return tokens, time.perf_counter() - start


def run(ctx: Context, smoke: bool) -> dict:
    from tinkerd.engine.client import InProcessEngine
    from tinkerd.types import Datum, LoraSpec

    cfg = sizes(smoke)
    model_dir = build_model(ctx)
    rng = np.random.default_rng(0)
    sequences = [[int(t) for t in rng.integers(3, VOCAB, size=cfg["seq_len"] + 1)] for _ in range(cfg["batch"])]
    datums = [Datum(tokens=np.array(s[:-1], dtype=np.int64),
                    inputs={"target_tokens": np.array(s[1:], dtype=np.int64), "weights": np.ones(len(s) - 1, np.float32)})
              for s in sequences]
    engine = InProcessEngine("bench-moe", model_dir)
    on_thread = lambda fn, *args: engine.run_on_engine_thread(fn, *args).result()  # noqa: E731 - one torch thread
    try:
        adapter_id = "bench-moe"
        engine.create_adapter(adapter_id, LoraSpec(rank=RANK, train_unembed=False, seed=0)).result()
        peft = on_thread(PeftMoeTrainer, model_dir, sequences)
        sides = {"tinkerd_engine": lambda: engine_train_step(engine, adapter_id, datums),
                 "transformers_peft": lambda: on_thread(peft.step)}
        for step in sides.values():  # warm-up
            step()
        step_s = time_in_turns(sides, cfg["rounds"], cfg["steps_per_round"])
        tokens_per_step = cfg["batch"] * cfg["seq_len"]
        train_tps = {name: tokens_per_step * len(t) / sum(t) for name, t in step_s.items()}
        log("moe train: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in train_tps.items()))

        generate = on_thread(MoeGenerate, model_dir)
        decode: dict[str, dict[str, float]] = {}
        for rows in (1, cfg["rows"]):
            prompts = [[int(t) for t in rng.integers(3, VOCAB, size=cfg["prompt"])] for _ in range(rows)]
            engine_decode(engine, prompts, 4)  # warm-up
            on_thread(generate, prompts, 4)
            results = {"tinkerd_engine": [], "transformers_generate": []}
            for _ in range(cfg["rounds"]):
                results["tinkerd_engine"].append(engine_decode(engine, prompts, cfg["new_tokens"]))
                settle()
                results["transformers_generate"].append(on_thread(generate, prompts, cfg["new_tokens"]))
                settle()
            decode[str(rows)] = {n: sum(t for t, _ in r) / sum(s for _, s in r) for n, r in results.items()}
            log(f"moe decode x{rows}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in decode[str(rows)].items()))
    finally:
        engine.shutdown()
    rows_out = [
        row("MoE 8x top-2 train fwd_bwd + optim_step", train_tps["tinkerd_engine"], "tok/s", train_tps["transformers_peft"],
            baseline_name="transformers+PEFT (experts via target_parameters)"),
        row("MoE decode, 1 request", decode["1"]["tinkerd_engine"], "tok/s", decode["1"]["transformers_generate"],
            baseline_name="HF generate batch 1"),
        row(f"MoE decode, {cfg['rows']} requests", decode[str(cfg["rows"])]["tinkerd_engine"], "tok/s",
            decode[str(cfg["rows"])]["transformers_generate"], baseline_name="HF generate batch"),
    ]
    return {"rows": rows_out, "details": {**cfg, "lora_rank": RANK, "train_step_s": step_s, "train_tokens_per_s": train_tps,
                                          "decode_tokens_per_s": decode, "engine": "in-process, both sides on one thread"}}
