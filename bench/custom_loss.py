"""Custom losses: a DPO step with the loss run on the server vs on the client.

Both sides train a rank-8 LoRA of the same base with the same pairwise (DPO-style) loss on the
same batch: each datum holds a prompt, a chosen and a rejected answer, and the loss is
−log σ(β · (Σ lp·chosen − Σ lp·rejected − reference margin)). One step =
`forward_backward_custom` + `optim_step`.

- server side: `ServiceClient.create_custom_loss` uploads the traced loss (the server
  advertises `custom_loss_server_side`), and the step is one forward_backward pass;
- client side (the baseline): the same per-datum loss passed as a plain callable, which the
  SDK always runs on the client: a forward pass, the loss and its gradient here, then a
  cross_entropy forward_backward with the gradient as weights (the path every SDK takes
  against a server without server-side losses).

The two take turns in rounds after a warm-up step each; tokens/s is total tokens over total
time. Target: the server-side step at least 1.3x the client-side one (it saves a whole
forward pass and a round trip).
"""

from __future__ import annotations

import numpy as np

from bench.common import Context, Target, close_quietly, log, random_tokens, row, time_in_turns

RANK = 8
BETA = 0.5


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": 2, "seq_len": 16, "rounds": 1, "steps_per_round": 1}
    return {"batch": 4, "seq_len": 128, "rounds": 2, "steps_per_round": 2}


def dpo(logprobs, chosen, rejected, ref_margin):
    import torch.nn.functional as F

    margin = (logprobs * chosen).sum() - (logprobs * rejected).sum() - ref_margin
    return -F.logsigmoid(BETA * margin), {"custom/margin:sum": margin.detach()}


RANKS = {"logprobs": 1, "chosen": 1, "rejected": 1, "ref_margin": 0}


def on_the_client(data, logprobs_list):
    """The same loss as a callable: the SDK runs it client-side."""
    total = 0.0
    for datum, lp in zip(data, logprobs_list, strict=True):
        args = [datum.loss_fn_inputs[name].to_torch() for name in ("chosen", "rejected", "ref_margin")]
        loss, _ = dpo(lp, *args)
        total = total + loss
    return total, {}


def pair_datums(ctx: Context, batch: int, seq_len: int, seed: int = 0) -> list:
    from tinker import types

    rng = np.random.default_rng(seed)
    datums = []
    for _ in range(batch):
        tokens = random_tokens(rng, ctx.shape.vocab, seq_len + 1)
        n = seq_len
        prompt, answer = n // 4, (n - n // 4) // 2
        chosen = np.zeros(n, dtype=np.float32)
        rejected = np.zeros(n, dtype=np.float32)
        chosen[prompt:prompt + answer] = 1.0
        rejected[prompt + answer:] = 1.0
        datums.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tokens[1:],
                "chosen": types.TensorData.from_numpy(chosen),
                "rejected": types.TensorData.from_numpy(rejected),
                "ref_margin": types.TensorData(data=[float(rng.normal(0, 0.1))], dtype="float32", shape=[]),
            },
        ))
    return datums


def run(ctx: Context, smoke: bool) -> dict:
    from tinker import types

    s = sizes(smoke)
    data = pair_datums(ctx, s["batch"], s["seq_len"])
    tokens = sum(d.model_input.length for d in data)
    sc = ctx.service_client()
    try:
        handle = sc.create_custom_loss(dpo, RANKS).result()
        if handle.loss_id is None:
            raise RuntimeError("the server did not take the loss: it does not advertise custom_loss_server_side")
        server_side = sc.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=0).result()
        client_side = sc.create_lora_training_client(base_model=ctx.model_name, rank=RANK, seed=0).result()
        adam = types.AdamParams(learning_rate=1e-5)

        def step(tc, loss):
            def one() -> None:
                fb = tc.forward_backward_custom(data, loss)
                opt = tc.optim_step(adam)
                fb.result()
                opt.result()
            return one

        sides = {"server": step(server_side, handle), "client": step(client_side, on_the_client)}
        for warm in sides.values():
            warm()
        step_s = time_in_turns(sides, s["rounds"], s["steps_per_round"])
        tps = {name: tokens * len(times) / sum(times) for name, times in step_s.items()}
        log(f"custom_loss: server-side {tps['server']:.0f} tok/s, client-side {tps['client']:.0f} tok/s")
    finally:
        close_quietly(sc)
    label = f"DPO step {s['batch']} x {s['seq_len']} tokens"
    return {
        "rows": [row(f"{label}, loss on the server", tps["server"], "tok/s", tps["client"], Target(">=", 1.3),
                     "the loss on the client (forward + surrogate backward)")],
        "sizes": s,
        "step_seconds": step_s,
    }
