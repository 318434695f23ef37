"""The unmodified tinker SDK trains and samples SmolLM2 against a real tinkerd process."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tinker
import torch
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

SFT_TEXTS = [
    "Q: What is the capital of France?\nA: Paris.",
    "Q: What colour is the sky on a clear day?\nA: Blue.",
    "Q: How many legs does a spider have?\nA: Eight.",
    "Q: What is two plus two?\nA: Four.",
]


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def mean_nll(result: types.ForwardBackwardOutput, data: list[types.Datum]) -> float:
    total_weight = sum(float(np.sum(d.loss_fn_inputs["weights"].to_numpy())) for d in data)
    return result.metrics["loss:sum"] / total_weight


@pytest.fixture(scope="module")
def trained(server, tokenizer):
    """One training run shared by the read-only checks below: 12 SFT steps, then a sampler save."""
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=7)
    data = [sft_datum(tokenizer, t) for t in SFT_TEXTS]
    losses = []
    for _ in range(12):
        fb = tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
        losses.append(mean_nll(fb, data))
    path = tc.save_weights_for_sampler("sft-12").result().path
    return {"sc": sc, "tc": tc, "data": data, "losses": losses, "path": path}


def test_capabilities_list_the_base_model(service_client):
    caps = service_client.get_server_capabilities()
    names = [m.model_name for m in caps.supported_models]
    assert BASE in names


def test_sft_lowers_the_loss_markedly(trained):
    losses = trained["losses"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_get_info_and_tokenizer(trained):
    tc = trained["tc"]
    info = tc.get_info()
    assert info.model_data.model_name == BASE
    assert info.lora_rank == 8
    tok = tc.get_tokenizer()
    assert tok.decode(tok.encode("hello world")) == "hello world"
    sampler = trained["sc"].create_sampling_client(model_path=trained["path"])
    assert sampler.get_tokenizer().encode("hello") == tok.encode("hello")


def test_forward_compute_logprobs_and_sampled_logprobs_agree(trained, tokenizer):
    tc, sc = trained["tc"], trained["sc"]
    # A fresh sampler snapshot of the current weights, so trainer and sampler agree exactly.
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = tokenizer.encode("Q: What is the capital of France?\nA:")
    res = sampler.sample(
        types.ModelInput.from_ints(prompt), num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0, seed=11),
    ).result()
    seq = res.sequences[0]
    full = prompt + list(seq.tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [0.0] * (len(full) - 1)},
    )
    fwd = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    scored = np.array(sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()[1:], dtype=np.float64)
    sampled = np.array(seq.logprobs)
    n = len(seq.tokens)
    assert np.max(np.abs(fwd - scored)) < 1e-3
    assert np.max(np.abs(fwd[-n:] - sampled)) < 1e-3
    assert np.max(np.abs(scored[-n:] - sampled)) < 1e-3
    del sc


def test_trained_checkpoint_samples_differently_from_base(trained, tokenizer):
    sc = trained["sc"]
    prompt = types.ModelInput.from_ints(tokenizer.encode("Q: What is two plus two?\nA:"))
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    tuned = sc.create_sampling_client(model_path=trained["path"]).sample(prompt, 1, params).result()
    base = sc.create_sampling_client(base_model=BASE).sample(prompt, 1, params).result()
    assert tokenizer.decode(tuned.sequences[0].tokens).strip().startswith("Four")
    assert tuned.sequences[0].tokens != base.sequences[0].tokens


def test_seed_determinism_and_num_samples(trained, tokenizer):
    sampler = trained["sc"].create_sampling_client(base_model=BASE)
    prompt = types.ModelInput.from_ints(tokenizer.encode("Once upon a time"))
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    a = sampler.sample(prompt, 3, params).result()
    b = sampler.sample(prompt, 3, params).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len(a.sequences) == 3
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # samples of one request differ
    other = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=10, temperature=1.0, seed=99)).result()
    assert [s.tokens for s in other.sequences] != [s.tokens for s in a.sequences]
    assert all(s.stop_reason == "length" for s in a.sequences)


def test_stop_forms(trained, tokenizer):
    sampler = trained["sc"].create_sampling_client(base_model=BASE)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_dict=False)
    prompt = types.ModelInput.from_ints(chat)
    # Default: stops at EOS (<|im_end|>, id 2) and includes it.
    default = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=64, temperature=0.0)).result().sequences[0]
    assert default.stop_reason == "stop" and default.tokens[-1] == 2
    # [] disables every stop condition, EOS included.
    no_stop = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=len(default.tokens) + 3, temperature=0.0, stop=[])).result().sequences[0]
    assert no_stop.stop_reason == "length" and len(no_stop.tokens) == len(default.tokens) + 3
    assert no_stop.tokens[: len(default.tokens)] == default.tokens
    # A token id: stop on the first token of the greedy answer after the first one.
    stop_id = default.tokens[1]
    by_id = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=64, temperature=0.0, stop=[stop_id])).result().sequences[0]
    assert by_id.stop_reason == "stop" and by_id.tokens == default.tokens[:2]
    # A string: generation stops once the decoded text contains it.
    text = tokenizer.decode(default.tokens[:3])
    needle = text.strip()[-2:]
    by_str = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=64, temperature=0.0, stop=[needle])).result().sequences[0]
    assert by_str.stop_reason == "stop"
    assert needle in tokenizer.decode(by_str.tokens)
    assert needle not in tokenizer.decode(by_str.tokens[:-1])


def test_prompt_logprobs_and_topk(trained, tokenizer):
    sampler = trained["sc"].create_sampling_client(base_model=BASE)
    ids = tokenizer.encode("The capital of France is Paris")
    res = sampler.sample(
        types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=2, temperature=1.0, seed=0),
        include_prompt_logprobs=True, topk_prompt_logprobs=3,
    ).result()
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
    assert all(lp is not None and lp <= 0 for lp in res.prompt_logprobs[1:])
    top = res.topk_prompt_logprobs
    assert len(top) == len(ids) and top[0] is None
    for i in range(1, len(ids)):
        best = max(lp for _, lp in top[i])
        assert best >= res.prompt_logprobs[i] - 1e-5


def test_sampler_checkpoint_is_a_snapshot(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=3)
    data = [sft_datum(tokenizer, t) for t in SFT_TEXTS[:2]]
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    path = tc.save_weights_for_sampler("snap").result().path
    sampler = sc.create_sampling_client(model_path=path)
    prompt = types.ModelInput.from_ints(tokenizer.encode("Q: How many legs does a spider have?\nA:"))
    before = sampler.compute_logprobs(prompt).result()

    # Keep training in another thread while the snapshot is sampled.
    def train_more():
        for _ in range(3):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()

    worker = threading.Thread(target=train_more)
    worker.start()
    during = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, temperature=1.0, seed=5)).result()
    worker.join()
    after = sc.create_sampling_client(model_path=path).compute_logprobs(prompt).result()
    np.testing.assert_allclose(np.array(before[1:]), np.array(after[1:]), atol=1e-5)
    assert len(during.sequences) == 2
    # The live weights did move on: a new snapshot scores the prompt differently.
    moved = tc.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    assert np.max(np.abs(np.array(moved[1:]) - np.array(before[1:]))) > 1e-3


def test_same_seed_same_initial_adapter(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    data = [sft_datum(tokenizer, SFT_TEXTS[0])]

    def loss_after_one_step(seed: int) -> float:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=seed)
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        return tc.forward(data, "cross_entropy").result().metrics["loss:sum"]

    a, b, c = loss_after_one_step(5), loss_after_one_step(5), loss_after_one_step(6)
    assert a == pytest.approx(b, abs=1e-5)
    assert abs(a - c) > 1e-4


def test_train_flags_choose_the_lora_targets(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    rest = sc.create_rest_client()
    for flags, expected in [
        (dict(train_attn=True, train_mlp=False, train_unembed=False), {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (dict(train_attn=False, train_mlp=True, train_unembed=True), {"gate_proj", "up_proj", "down_proj", "lm_head"}),
    ]:
        tc = sc.create_lora_training_client(base_model=BASE, rank=2, **flags)
        path = tc.save_weights_for_sampler("flags").result().path
        run_id = path.removeprefix("tinker://").split("/")[0]
        import json
        from pathlib import Path

        # one directory per saved version (flags or flags@<version>)
        (directory,) = (Path(server.data_dir) / "checkpoints" / run_id / "sampler_weights").glob("flags*")
        config = json.loads((directory / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == expected
        assert config["r"] == 2
    del rest


def test_resume_with_optimizer_matches_uninterrupted_training(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    data = [sft_datum(tokenizer, t) for t in SFT_TEXTS[:2]]
    adam = types.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)

    def step(tc) -> float:
        loss = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(adam).result()
        return loss

    straight = sc.create_lora_training_client(base_model=BASE, rank=4, seed=21)
    straight_losses = [step(straight) for _ in range(6)]

    first = sc.create_lora_training_client(base_model=BASE, rank=4, seed=21)
    resumed_losses = [step(first) for _ in range(3)]
    state = first.save_state("half").result().path
    resumed = sc.create_training_client_from_state_with_optimizer(state)
    resumed_losses += [step(resumed) for _ in range(3)]
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-4, atol=1e-4)

    # Without the optimizer state, Adam restarts: the first resumed step differs.
    fresh_opt = sc.create_training_client_from_state(state)
    losses_fresh = [step(fresh_opt) for _ in range(3)]
    assert losses_fresh[0] == pytest.approx(straight_losses[3], abs=1e-4)  # same weights
    assert abs(losses_fresh[2] - straight_losses[5]) > 1e-4  # different optimizer trajectory


def test_gradients_accumulate_until_optim_step(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    data = [sft_datum(tokenizer, t) for t in SFT_TEXTS[:2]]
    adam = types.AdamParams(learning_rate=1e-2)
    one = sc.create_lora_training_client(base_model=BASE, rank=4, seed=2)
    one.forward_backward(data, "cross_entropy").result()
    one.optim_step(adam).result()
    two = sc.create_lora_training_client(base_model=BASE, rank=4, seed=2)
    two.forward_backward(data[:1], "cross_entropy").result()
    two.forward_backward(data[1:], "cross_entropy").result()
    two.optim_step(adam).result()
    a = one.forward(data, "cross_entropy").result().metrics["loss:sum"]
    b = two.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-4)


def test_forward_backward_custom_gives_the_right_gradient(server, tokenizer):
    """A custom loss −Σ 2·lp equals cross_entropy with weights 2: one step of each must agree."""
    sc = tinker.ServiceClient(base_url=server.base_url)
    data = [sft_datum(tokenizer, t) for t in SFT_TEXTS[:2]]
    adam = types.AdamParams(learning_rate=1e-2)

    def custom_loss(data, logprobs_list):
        loss = sum(-(2.0 * lp).sum() for lp in logprobs_list)
        return loss, {"custom:sum": float(loss.detach())}

    custom = sc.create_lora_training_client(base_model=BASE, rank=4, seed=9)
    out = custom.forward_backward_custom(data, custom_loss).result()
    custom.optim_step(adam).result()

    doubled = [
        types.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "weights": (2.0 * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).tolist(),
        }) for d in data
    ]
    reference = sc.create_lora_training_client(base_model=BASE, rank=4, seed=9)
    ref_out = reference.forward_backward(doubled, "cross_entropy").result()
    reference.optim_step(adam).result()

    assert out.metrics["loss:sum"] == pytest.approx(ref_out.metrics["loss:sum"], rel=1e-4)
    a = custom.forward(data, "cross_entropy").result().metrics["loss:sum"]
    b = reference.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-4)


def test_negative_weights_push_the_other_way(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    datum = sft_datum(tokenizer, SFT_TEXTS[0])
    neg = types.Datum(model_input=datum.model_input, loss_fn_inputs={
        "target_tokens": datum.loss_fn_inputs["target_tokens"],
        "weights": (-np.ones(len(datum.loss_fn_inputs["weights"].to_numpy()), dtype=np.float32)).tolist(),
    })
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1)
    before = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    out = tc.forward_backward([neg], "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(-before, rel=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after > before  # unlikelihood: the text became less likely


def test_async_variants(server, tokenizer):
    import asyncio

    async def main():
        sc = tinker.ServiceClient(base_url=server.base_url)
        tc = await sc.create_lora_training_client_async(base_model=BASE, rank=4)
        data = [sft_datum(tokenizer, SFT_TEXTS[1])]
        fb = await (await tc.forward_backward_async(data, "cross_entropy"))
        await (await tc.optim_step_async(types.AdamParams(learning_rate=1e-3)))
        sampler = await tc.save_weights_and_get_sampling_client_async()
        res = await sampler.sample_async(data[0].model_input, 2, types.SamplingParams(max_tokens=3, seed=1))
        return fb, res

    fb, res = asyncio.run(main())
    assert fb.metrics["loss:sum"] > 0 and len(res.sequences) == 2


def test_legacy_load_state_restores_weights_and_optimizer(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    data = [sft_datum(tokenizer, SFT_TEXTS[2])]
    adam = types.AdamParams(learning_rate=5e-3)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=13)
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(adam).result()
    state = tc.save_state("legacy").result().path
    saved_loss = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    for _ in range(2):  # move away from the saved state
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(adam).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] < saved_loss - 1e-3
    tc.load_state(state).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(saved_loss, abs=1e-4)
    tc.load_state_with_optimizer(state).result()
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(adam).result()
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] < saved_loss


@pytest.mark.slow
def test_heartbeats_keep_a_session_alive_and_close_finishes_it(start_server, tokenizer):
    import time

    srv = start_server(["--session-timeout", "15"])
    sc = tinker.ServiceClient(base_url=srv.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=2)
    time.sleep(25)  # idle, but the SDK heartbeats every 10 s
    tc.forward_backward([sft_datum(tokenizer, SFT_TEXTS[0])], "cross_entropy").result()
    model_id = tc.get_info().model_id
    sc.close("success", detail="done").result()  # POST /sessions/{id}/finish: the session's in-memory state is freed
    import httpx

    r = httpx.post(srv.base_url + "/api/v1/get_info", json={"model_id": model_id, "type": "get_info"},
                   headers={"X-API-Key": "tml-test"})
    assert r.status_code == 200  # the run's metadata stays
    r = httpx.post(srv.base_url + "/api/v1/optim_step", headers={"X-API-Key": "tml-test"}, json={
        "model_id": model_id, "seq_id": 99, "type": "optim_step", "adam_params": {"learning_rate": 1e-3}})
    assert r.status_code == 404
