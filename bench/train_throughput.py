"""1. Training throughput: tinkerd through the SDK against transformers + PEFT in-process.

Both sides train a rank-8 LoRA on the attention and MLP projections (not the unembedding)
of the same fp32 base model, on the same batch of token sequences, with cross-entropy
summed over every target token and AdamW. One step = forward_backward + optim_step
(server: both submitted, then both awaited, as SDK users pipeline them; baseline: forward,
loss, backward, optimizer step, zero_grad). The two sides take turns in rounds, never at
the same time, after one warm-up step each; tokens/s is total tokens over total time.

A second, small step (8 x 64 tokens) is measured the same way: there a step's fixed costs
(HTTP and protobuf, futures, ordering, the optimizer over every adapter tensor) weigh more
against its matmuls, so it must keep up with the PEFT loop too.

Also: achieved GFLOP/s (analytic FLOPs per token x tokens/s) against the machine's fp32
matmul peak measured now with torch.mm at the model's shapes for the batch's row count.
"""

from __future__ import annotations

import gc

import numpy as np

from bench.common import (
    LORA_TARGETS,
    Context,
    Target,
    close_quietly,
    load_hf_model,
    log,
    matmul_gflops,
    random_tokens,
    row,
    settle,
    time_in_turns,
)

RANK = 8
LEARNING_RATE = 1e-4


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": 2, "seq_len": 16, "rounds": 1, "steps_per_round": 1}
    return {"batch": 8, "seq_len": 128, "rounds": 2, "steps_per_round": 3}


def small_step_sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": 2, "seq_len": 8, "rounds": 1, "steps_per_round": 1}
    return {"batch": 8, "seq_len": 64, "rounds": 3, "steps_per_round": 4}


def make_sequences(ctx: Context, batch: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [random_tokens(rng, ctx.shape.vocab, seq_len + 1) for _ in range(batch)]


def sdk_datums(sequences: list[list[int]]) -> list:
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)},
        )
        for seq in sequences
    ]


def sdk_step(training_client, datums: list, learning_rate: float = LEARNING_RATE) -> float:
    """One forward_backward + optim_step through the SDK; returns the summed loss."""
    from tinker import types

    fb = training_client.forward_backward(datums, "cross_entropy")
    opt = training_client.optim_step(types.AdamParams(learning_rate=learning_rate))
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


class EngineTrainer:
    """Reference: tinkerd's engine driven in this process, without the server or the SDK."""

    def __init__(self, ctx: Context, sequences: list[list[int]]):
        from tinkerd.types import AdamParams, Datum, LoraSpec

        self.engine = ctx.engine()
        self.adapter_id = "bench-train-throughput"
        self.adam = AdamParams(learning_rate=LEARNING_RATE)
        self.engine.create_adapter(self.adapter_id, LoraSpec(rank=RANK, train_unembed=False, seed=0)).result()
        self.datums = [
            Datum(tokens=np.array(seq[:-1], dtype=np.int64),
                  inputs={"target_tokens": np.array(seq[1:], dtype=np.int64), "weights": np.ones(len(seq) - 1, np.float32)})
            for seq in sequences
        ]

    def step(self) -> float:
        from tinkerd.types import ForwardBackwardCall

        engine = self.engine
        fb = engine.forward_backward(ForwardBackwardCall(self.adapter_id, self.datums, "cross_entropy", {}, False))
        opt = engine.optim_step(self.adapter_id, self.adam)
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        return loss

    def close(self) -> None:
        self.engine.drop_adapter(self.adapter_id).result()


class PeftTrainer:
    """The baseline: a plain transformers + PEFT LoRA loop, as a user would write it."""

    def __init__(self, ctx: Context, sequences: list[list[int]]):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        self.setup(get_peft_model(load_hf_model(ctx.model_dir), config), sequences)

    def setup(self, peft_model, sequences: list[list[int]]) -> None:  # noqa: ANN001 - a PEFT model
        """AdamW over the PEFT model's trainable parameters, and the batch as input and target tokens."""
        import torch

        self.torch = torch
        self.model = peft_model
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        data = torch.tensor(sequences)
        self.inputs, self.targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step(self) -> float:
        torch = self.torch
        with torch.enable_grad():  # it runs on the engine's thread, where autograd is off by default
            logits = self.model(input_ids=self.inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     self.targets.reshape(-1), reduction="sum")
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def matmul_peak(ctx: Context, rows: int) -> dict:
    """fp32 torch.mm GFLOP/s at each of the model's matmul shapes for `rows` tokens."""
    shapes = ctx.shape.matmul_shapes(rows)
    rates = {name: matmul_gflops(*shape) for name, (shape, _) in shapes.items()}
    # The forward pass's own mix of those shapes: its FLOPs over the time each shape would take.
    flops = {name: 2 * m * k * n * count for name, ((m, k, n), count) in shapes.items()}
    mix = sum(flops.values()) / sum(flops[name] / (rates[name] * 1e9) for name in flops) / 1e9
    return {"per_shape_gflops": rates, "peak_gflops": max(rates.values()), "model_mix_gflops": mix, "rows": rows}


def measure(ctx: Context, cfg: dict) -> dict:
    """Steps of the SDK, the in-process engine and the PEFT loop on one batch, in turns."""
    batch, seq_len = cfg["batch"], cfg["seq_len"]
    tokens_per_step = batch * seq_len
    sequences = make_sequences(ctx, batch, seq_len)

    service = ctx.service_client()
    training = service.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=0, train_unembed=False).result()
    datums = sdk_datums(sequences)
    log(f"train_throughput: {batch} x {seq_len} tokens, LoRA r={RANK}; warm-up")
    first_loss = {"tinkerd_sdk": sdk_step(training, datums)}
    settle()
    engine = EngineTrainer(ctx, sequences)
    first_loss["tinkerd_engine_in_process"] = engine.step()
    settle()
    baseline = ctx.on_torch_thread(PeftTrainer, ctx, sequences)
    first_loss["transformers_peft"] = ctx.on_torch_thread(baseline.step)
    settle()

    sides = {"tinkerd_sdk": lambda: sdk_step(training, datums), "tinkerd_engine_in_process": engine.step,
             "transformers_peft": lambda step=baseline.step: ctx.on_torch_thread(step)}

    def report(round_index: int, step_s: dict[str, list[float]]) -> None:
        log(f"train_throughput: {batch} x {seq_len}, round {round_index + 1}: " + ", ".join(
            f"{name} {tokens_per_step * len(times) / sum(times):.0f} tok/s" for name, times in step_s.items()))

    step_s = time_in_turns(sides, cfg["rounds"], cfg["steps_per_round"], report)
    close_quietly(service)
    engine.close()
    trainable_params = baseline.trainable_params
    del baseline, sides
    gc.collect()
    tps = {name: tokens_per_step * len(times) / sum(times) for name, times in step_s.items()}
    return {**cfg, "tokens_per_step": tokens_per_step, "trainable_params": trainable_params, "step_s": step_s,
            "tokens_per_s": tps, "first_step_loss_sum": first_loss}


def run(ctx: Context, smoke: bool) -> dict:
    cfg = sizes(smoke)
    measured = measure(ctx, cfg)
    small = measure(ctx, small_step_sizes(smoke))
    tokens_per_step, tps = measured["tokens_per_step"], measured["tokens_per_s"]
    peak = ctx.on_torch_thread(matmul_peak, ctx, tokens_per_step)
    flops_per_token = ctx.shape.lora_train_flops_per_token(cfg["seq_len"], RANK)
    gflops = {name: rate * flops_per_token / 1e9 for name, rate in tps.items()}
    small_tps = small["tokens_per_s"]
    small_name = f"small step {small['batch']}x{small['seq_len']} fwd_bwd + optim_step"
    rows = [
        row("train fwd_bwd + optim_step", tps["tinkerd_sdk"], "tok/s", tps["transformers_peft"], Target(">=", 0.9),
            baseline_name="transformers+PEFT"),
        row("  same, engine in-process (reference)", tps["tinkerd_engine_in_process"], "tok/s", tps["transformers_peft"],
            baseline_name="transformers+PEFT"),
        row(small_name, small_tps["tinkerd_sdk"], "tok/s", small_tps["transformers_peft"], Target(">=", 1.0),
            baseline_name="transformers+PEFT"),
        row("  same, engine in-process (reference)", small_tps["tinkerd_engine_in_process"], "tok/s",
            small_tps["transformers_peft"], baseline_name="transformers+PEFT"),
        row("train, achieved vs matmul peak", gflops["tinkerd_sdk"], "GFLOP/s", peak["peak_gflops"], baseline_name="torch.mm peak"),
        row("  baseline, achieved vs matmul peak", gflops["transformers_peft"], "GFLOP/s", peak["peak_gflops"],
            baseline_name="torch.mm peak"),
    ]
    details = {
        **measured, "lora_rank": RANK, "lora_targets": LORA_TARGETS,
        "small_step": small,
        "gflop_per_token_fwd_bwd": flops_per_token / 1e9,
        "achieved_gflops": gflops,
        "matmul": peak,
        "fraction_of_peak": {name: g / peak["peak_gflops"] for name, g in gflops.items()},
        "fraction_of_model_mix_peak": {name: g / peak["model_mix_gflops"] for name, g in gflops.items()},
    }
    return {"rows": rows, "details": details}
