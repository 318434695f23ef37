"""Server-side custom losses through the unmodified SDK: `create_custom_loss` uploads the traced
loss, `forward_backward_custom` runs it in one pass on the server, and the result must be the
client-side path's (the SDK's forward, the loss on the client, a cross_entropy backward)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
import torch
import torch.nn.functional as F
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAM = types.AdamParams(learning_rate=1e-2)


def dpo(logprobs, chosen, rejected, ref_margin):
    """A DPO-style pairwise loss: each datum holds a prompt, a chosen and a rejected answer."""
    margin = (logprobs * chosen).sum() - (logprobs * rejected).sum() - ref_margin
    loss = -F.logsigmoid(0.5 * margin)
    return loss, {"custom/accuracy:mean": (margin > 0).float(), "custom/margin:sum": margin.detach()}


DPO_RANKS = {"logprobs": 1, "chosen": 1, "rejected": 1, "ref_margin": 0}


def weighted_nll(logprobs, weights):
    """A per-token loss with a clamp, as a loss that caps each token's pull might."""
    loss = -(torch.clamp(logprobs, min=-20.0) * weights).sum()
    return loss, {"custom/nll:sum": loss.detach(), "custom/mean_lp:mean": logprobs.mean()}


NLL_RANKS = {"logprobs": 1, "weights": 1}


def as_client_side(per_datum, names):
    """The same per-datum loss as a plain callable, which the SDK always runs client-side:
    summed over datums, metrics summed or averaged by their suffix."""

    def loss_fn(data, logprobs_list):
        total, sums = 0.0, {}
        for datum, lp in zip(data, logprobs_list, strict=True):
            args = [datum.loss_fn_inputs[n].to_torch() for n in names]
            loss, metrics = per_datum(lp, *args)
            total = total + loss
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        return total, {k: v / len(data) if k.endswith(":mean") else v for k, v in sums.items()}

    return loss_fn


def pair_datum(tokenizer, prompt: str, chosen: str, rejected: str, ref_margin: float) -> types.Datum:
    p, c, r = tokenizer.encode(prompt), tokenizer.encode(chosen), tokenizer.encode(rejected)
    tokens = p + c + r
    n = len(tokens) - 1  # targets are the next tokens
    chosen_mask = [0.0] * n
    rejected_mask = [0.0] * n
    for i in range(len(p) - 1, len(p) + len(c) - 1):
        chosen_mask[i] = 1.0
    for i in range(len(p) + len(c) - 1, n):
        rejected_mask[i] = 1.0
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "chosen": types.TensorData.from_numpy(np.array(chosen_mask, dtype=np.float32)),
            "rejected": types.TensorData.from_numpy(np.array(rejected_mask, dtype=np.float32)),
            "ref_margin": types.TensorData(data=[ref_margin], dtype="float32", shape=[]),
        },
    )


def nll_datum(tokenizer, text: str) -> types.Datum:
    tokens = tokenizer.encode(text)
    weights = np.linspace(0.5, 1.5, len(tokens) - 1).astype(np.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights.tolist()})


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return [
        pair_datum(tokenizer, "Q: 2 + 2 = ?\nA:", " 4", " 5", 0.2),
        pair_datum(tokenizer, "The capital of France is", " Paris.", " Rome.", -0.1),
    ]


def logprobs_of(tc, data):
    """The model's target logprobs of `data` (a forward with zero weights)."""
    plain = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "weights": types.TensorData.from_numpy(np.zeros(d.model_input.length, dtype=np.float32))}) for d in data]
    return [o["logprobs"].to_numpy() for o in tc.forward(plain, "cross_entropy").result().loss_fn_outputs]


def after_one_step(tc, data, loss):
    out = tc.forward_backward_custom(data, loss).result()
    tc.optim_step(ADAM).result()
    return out, logprobs_of(tc, data)


@pytest.mark.parametrize("per_datum, ranks, make_data", [
    (dpo, DPO_RANKS, "pairs"),
    (weighted_nll, NLL_RANKS, "nll"),
])
def test_server_side_loss_trains_like_the_client_side_path(server, tokenizer, pairs, per_datum, ranks, make_data):
    data = pairs if make_data == "pairs" else [nll_datum(tokenizer, t) for t in ("Hello there, friend.", "One two three")]
    sc = tinker.ServiceClient(base_url=server.base_url)
    handle = sc.create_custom_loss(per_datum, ranks).result()
    assert handle.loss_id is not None  # uploaded: the server advertises custom_loss_server_side

    server_side = sc.create_lora_training_client(base_model=BASE, rank=4, seed=5)
    out_s, lps_s = after_one_step(server_side, data, handle)
    client_side = sc.create_lora_training_client(base_model=BASE, rank=4, seed=5)
    out_c, lps_c = after_one_step(client_side, data, as_client_side(per_datum, list(ranks)[1:]))
    before = [o["logprobs"].to_numpy() for o in out_c.loss_fn_outputs]  # the client-side pass's, before its step

    assert "surrogate_loss:sum" not in out_s.metrics  # one pass, no surrogate
    assert "surrogate_loss:sum" in out_c.metrics
    keys = {k for k in out_c.metrics if k != "surrogate_loss:sum"}
    assert set(out_s.metrics) == keys
    for key in keys:
        assert out_s.metrics[key] == pytest.approx(out_c.metrics[key], rel=1e-4, abs=1e-5), key
    for o, b in zip(out_s.loss_fn_outputs, before, strict=True):  # the server-side pass's logprobs
        np.testing.assert_allclose(o["logprobs"].to_numpy(), b, atol=1e-4)
    # Same gradient → same weights after the step: the two models' logprobs agree, and moved.
    for s, c, b in zip(lps_s, lps_c, before, strict=True):
        np.testing.assert_allclose(s, c, atol=2e-4)
        assert np.max(np.abs(s - b)) > 1e-3


def test_a_loss_id_works_only_in_its_session(server, pairs):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1)
    other = tinker.ServiceClient(base_url=server.base_url).create_custom_loss(dpo, DPO_RANKS).result()
    with pytest.raises(tinker.BadRequestError, match="unknown loss_id"):
        tc.forward_backward(pairs, "custom", {"loss_id": other.loss_id}).result()
    with pytest.raises(tinker.BadRequestError, match="unknown loss_id"):
        tc.forward_backward(pairs, "custom", {"loss_id": "sess-none:loss:0"}).result()
    with pytest.raises(tinker.BadRequestError, match="loss_id"):
        tc.forward_backward(pairs, "custom").result()
    # The refused requests used up their seq_ids: the client goes on.
    handle = sc.create_custom_loss(dpo, DPO_RANKS).result()
    assert np.isfinite(tc.forward_backward_custom(pairs, handle).result().metrics["loss:sum"])


def test_the_server_refuses_what_its_allowlist_lacks(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)

    def outer(logprobs):  # the SDK allows any torch function; the server does not
        return torch.outer(logprobs, logprobs).sum(), {}

    with pytest.raises(tinker.BadRequestError, match="node 'outer'.*allowlist"):
        sc.create_custom_loss(outer, {"logprobs": 1}).result()

    def pairwise(logprobs):  # [T, T] is past a datum's bound for a long datum
        return (logprobs[:, None] - logprobs[None, :]).exp().sum(), {}

    handle = sc.create_custom_loss(pairwise, {"logprobs": 1}).result()
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1)
    long = nll_datum(tokenizer, " ".join(["word"] * 400))
    with pytest.raises(tinker.RequestFailedError, match="node 'sub'.*bound"):
        tc.forward_backward_custom([long], handle).result()


def test_a_loss_that_fails_on_its_values_fails_that_call_and_the_run_goes_on(server, tokenizer):
    """Refused only once it meets the real log-probs (its dry run on zeros passes): the call
    fails as the user's, naming the node, and the same run trains on afterwards."""
    def past_the_end(logprobs, weights):
        index = ((logprobs < -1e-6) & (weights > 0)).sum()  # every row on real log-probs: one too far
        return -logprobs[index], {}

    sc = tinker.ServiceClient(base_url=server.base_url)
    handle = sc.create_custom_loss(past_the_end, NLL_RANKS).result()
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1)
    data = [nll_datum(tokenizer, "Hello there, friend.")]
    with pytest.raises(tinker.RequestFailedError, match="node 'getitem'.*out of bounds") as failed:
        tc.forward_backward_custom(data, handle).result()
    assert failed.value.category == types.RequestErrorCategory.User
    assert np.isfinite(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
    tc.optim_step(ADAM).result()


def test_a_forbidden_graph_is_refused_with_400_and_never_runs(server, tmp_path):
    sentinel = tmp_path / "opened"
    headers = {"X-API-Key": "tml-test"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        session_id = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "0"}).json()["session_id"]
        graph = {"format": 1, "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
            {"op": "call_function", "name": "sneaky", "target": "builtins.open", "args": [str(sentinel), "w"], "kwargs": {}},
            {"op": "output", "name": "output", "target": "output",
             "args": [{"tuple": [{"ref": "logprobs"}, {"dict": {}}]}], "kwargs": {}},
        ]}
        body = {"session_id": session_id, "custom_loss_seq_id": 0, "name": "sneaky",
                "inputs": [{"name": "logprobs", "rank": 1}], "graph": graph, "type": "create_custom_loss"}
        response = http.post("/api/v1/create_custom_loss", json=body)
        assert response.status_code == 400
        assert "node 'sneaky'" in response.json()["detail"] and "builtins.open" in response.json()["detail"]
        assert not sentinel.exists()
        assert http.get("/api/v1/healthz").status_code == 200
