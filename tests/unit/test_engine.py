"""The engine against transformers, and its batching promises, on the real default model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from tinkerd.engine.client import InProcessEngine
from tinkerd.engine.model import AdapterBatch, KVCache
from tinkerd.types import (
    AdamParams,
    AdapterRef,
    Datum,
    ForwardBackwardCall,
    LoraSpec,
    SampleRequest,
    SamplingParams,
    UserError,
)

TOKENS = np.array([1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1024, 2, 88, 913], dtype=np.int64)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = InProcessEngine("test", model_dir, device="cpu")
    yield eng
    eng.shutdown()


def datum(tokens=TOKENS) -> Datum:
    return Datum(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, np.float32)})


def train(engine, adapter_id: str, datums: list[Datum]):
    """One forward_backward through the engine's door, awaited."""
    return engine.forward_backward(ForwardBackwardCall(adapter_id, datums, "cross_entropy", {}, False)).result()


def gradients(engine, adapter_id: str) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in engine.trainer.adapters[adapter_id].params.items() if p.grad is not None}


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding: passes of other shapes run their matmuls in other blocks, so
    sums differ in their last bits (on CPUs with AMX, by up to ~1e-5 of the largest entry). A
    gradient that took in another adapter's rows would differ by the size of its entries."""
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-3)


def test_logits_match_transformers(engine, model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    toks = torch.from_numpy(TOKENS)[None]
    with torch.no_grad():
        ours = engine.model.logits(engine.model.hidden_states(toks))
        theirs = hf(toks).logits
    assert torch.max(torch.abs(ours - theirs)).item() < 1e-3


@pytest.fixture(params=["fused", "torch"])
def decode_path(request, engine):
    """Decode-step tests run through the fused CPU kernels (when they built) and the torch path."""
    kernels = engine.model.kernels
    if request.param == "fused" and kernels is None:
        pytest.skip("the fused CPU kernels are not available here")
    if request.param == "torch":
        engine.model.kernels = None
    yield request.param
    engine.model.kernels = kernels


def prefill_into(model, cache: KVCache, row: int, prompt: torch.Tensor) -> None:
    """Cache the K/V of `prompt` [1, n] in `cache` row `row`, as the engine's prefill does."""
    kv: list = []
    model.hidden_states(prompt, kv_out=kv)
    n = prompt.shape[1]
    for layer, (k, v) in enumerate(kv):
        cache.k[layer, row, :, :n] = k[0]
        cache.v[layer, row, :, :n] = v[0]


def test_decode_with_kv_cache_matches_a_full_pass(engine, decode_path):
    model = engine.model
    toks = torch.from_numpy(TOKENS)[None]
    with torch.no_grad():
        full = model.logits(model.hidden_states(toks))[0]
        cache = KVCache(model.cfg, 1, 32, model.device, model.dtype)
        prefill_into(model, cache, 0, toks[:, :6])
        for pos in range(6, len(TOKENS)):
            step = model.logits(model.hidden_states(toks[:, pos : pos + 1], AdapterBatch.single(None, 1),
                                                    positions=torch.tensor([[pos]]), cache=cache))[0, 0]
            assert torch.max(torch.abs(step - full[pos])).item() < 1e-3


def test_decode_rows_at_different_positions_match_full_passes(engine, decode_path):
    """Rows joining the batch at different times sit at different positions: each row's
    decode step must see only its own cached span (the masked, scattered-write path)."""
    model = engine.model
    prompts = [torch.from_numpy(TOKENS)[None], torch.from_numpy(TOKENS[3:])[None]]
    with torch.no_grad():
        fulls = [model.logits(model.hidden_states(p))[0] for p in prompts]
        cache = KVCache(model.cfg, 2, 32, model.device, model.dtype)
        starts = [6, 3]
        for row, (p, start) in enumerate(zip(prompts, starts, strict=True)):
            prefill_into(model, cache, row, p[:, :start])
        for step in range(4):
            positions = torch.tensor([[start + step] for start in starts])
            tokens = torch.stack([p[0, pos] for p, pos in zip(prompts, positions[:, 0], strict=True)])[:, None]
            logits = model.logits(model.hidden_states(tokens, None, positions=positions, cache=cache), decoding=True)[:, 0]
            for row in range(2):
                assert torch.max(torch.abs(logits[row] - fulls[row][positions[row, 0]])).item() < 1e-3


def test_a_bfloat16_decode_step_matches_its_full_pass(model_dir):
    """The dtype the engine uses on CUDA, exercised on CPU: the decode step keeps the cache,
    rotary tables and norms in the model's dtype."""
    from tinkerd.engine.model import LlamaModel

    model = LlamaModel.load(model_dir, torch.device("cpu"), torch.bfloat16)
    toks = torch.from_numpy(TOKENS[:8])[None]
    with torch.no_grad():
        full = model.logits(model.hidden_states(toks))[0]
        cache = KVCache(model.cfg, 1, 16, model.device, model.dtype)
        prefill_into(model, cache, 0, toks[:, :6])
        for pos in (6, 7):
            step = model.logits(model.hidden_states(toks[:, pos : pos + 1], None, positions=torch.tensor([[pos]]),
                                                    cache=cache), decoding=True)[0, 0]
            assert cache.k.dtype == torch.bfloat16 and step.dtype == torch.float32
            # bf16 rounding differs between one pass and step-by-step; the distributions agree.
            assert torch.argmax(step) == torch.argmax(full[pos])
            assert torch.max(torch.abs(torch.log_softmax(step, -1) - torch.log_softmax(full[pos], -1))[:1000]).item() < 0.5


def test_calls_of_different_adapters_share_a_pass_and_keep_their_own_gradients(engine):
    for name in ("solo", "a", "b"):
        engine.create_adapter(name, LoraSpec(rank=4, seed=1 if name != "b" else 2)).result()
    other = np.array([1, 77, 78, 79, 80, 81, 2], dtype=np.int64)
    solo = train(engine, "solo", [datum()])
    solo_grads = gradients(engine, "solo")
    engine.optim_step("solo", AdamParams(learning_rate=1e-2)).result()

    # Hold the engine thread so both calls are queued, then release: they must run as one pass.
    gate = threading.Event()
    blocker = engine.run_on_engine_thread(gate.wait)
    before = dict(engine.trainer.stats)
    fa = engine.forward_backward(ForwardBackwardCall("a", [datum()], "cross_entropy", {}, False))
    fb = engine.forward_backward(ForwardBackwardCall("b", [datum(other)], "cross_entropy", {}, False))
    gate.set()
    blocker.result()
    ra, rb = fa.result(), fb.result()
    assert engine.trainer.stats["forward_backward_calls"] - before["forward_backward_calls"] == 2
    assert engine.trainer.stats["forward_backward_passes"] - before["forward_backward_passes"] == 1
    # "a" (same seed and data as "solo") got solo's loss, logprobs and gradient, to float32 rounding
    # (a pass of two padded rows runs its matmuls in other blocks than one of one row: on CPUs
    # with AMX the logprobs differ by a few 1e-6 relative).
    assert ra.metrics["loss:sum"] == pytest.approx(solo.metrics["loss:sum"], rel=1e-5)
    np.testing.assert_allclose(ra.outputs[0]["logprobs"], solo.outputs[0]["logprobs"], atol=1e-5, rtol=1e-5)
    assert rb.outputs[0]["logprobs"].shape == (len(other) - 1,)
    a_grads = gradients(engine, "a")
    assert a_grads.keys() == solo_grads.keys() and any(g.abs().sum() > 0 for g in solo_grads.values())
    for name, grad in solo_grads.items():
        assert_same_gradient(a_grads[name], grad)


def test_a_call_larger_than_one_pass_runs_in_several_and_sums_their_gradients(engine):
    """A forward_backward of more padded tokens than one pass holds (512 on CPU) runs as several
    passes; the loss, logprobs and gradient are those of one pass over everything."""
    for name in ("whole", "split"):
        engine.create_adapter(name, LoraSpec(rank=4, seed=3)).result()
    datums = [datum(np.roll(TOKENS, i)) for i in range(3)]  # 3 rows of 12 tokens
    trainer = engine.trainer
    budget = trainer.train_pass_tokens
    try:
        trainer.train_pass_tokens = 10_000
        before = trainer.stats["forward_backward_passes"]
        whole = train(engine, "whole", datums)
        assert trainer.stats["forward_backward_passes"] - before == 1
        trainer.train_pass_tokens = 24  # two rows of 12 per pass
        before = trainer.stats["forward_backward_passes"]
        split = train(engine, "split", datums)
        assert trainer.stats["forward_backward_passes"] - before == 2
    finally:
        trainer.train_pass_tokens = budget
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for got, want in zip(split.outputs, whole.outputs, strict=True):  # float32 rounding of other matmul blocks
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5, rtol=1e-5)
    grads = {name: trainer.adapters[name].weights.b for name in ("whole", "split")}
    for path, weight in grads["whole"].items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        assert_same_gradient(grads["split"][path].grad, weight.grad)


def test_concurrent_samples_share_decode_steps_and_stay_deterministic(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=17, ignore_eos=True)
    alone = engine.sample(SampleRequest(prompt=TOKENS[:5].tolist(), num_samples=1, params=params)).result()
    stats = engine.sampler.stats
    before = stats["decode_steps"]
    prefills = stats["prefill_passes"]
    gate = threading.Event()
    blocker = engine.run_on_engine_thread(gate.wait)  # hold the engine so all four arrive together
    futures = [
        engine.sample(SampleRequest(prompt=TOKENS[: 4 + i].tolist(), num_samples=2,
                                    params=SamplingParams(max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True)))
        for i in range(3)
    ]
    again = engine.sample(SampleRequest(prompt=TOKENS[:5].tolist(), num_samples=1, params=SamplingParams(
        max_tokens=8, temperature=1.0, seed=17, ignore_eos=True)))
    gate.set()
    blocker.result()
    for f in futures:
        assert all(len(s.tokens) == 8 for s in f.result().sequences)
    assert again.result().sequences[0].tokens == alone.sequences[0].tokens
    # 4 requests x 8 tokens (the first token of each comes from its prefill): far fewer steps than one at a time.
    assert stats["decode_steps"] - before < 4 * 7
    assert stats["prefill_passes"] - prefills == 1  # the four prompts shared one prefill pass
    np.testing.assert_allclose(again.result().sequences[0].logprobs, alone.sequences[0].logprobs, atol=1e-4)


def test_an_idle_engine_lets_requests_sent_together_share_one_prefill(engine):
    """Requests reaching an idle engine a little apart (a server parsing a batch of HTTP
    requests) are prefilled together once arrivals pause, not the first one alone."""
    scheduler = engine.scheduler
    quiet, most = scheduler.admit_quiet_s, scheduler.admit_max_s
    scheduler.admit_quiet_s, scheduler.admit_max_s = 0.5, 3.0  # wide, so a loaded machine cannot split them
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        prefills = engine.sampler.stats["prefill_passes"]
        first = engine.sample(SampleRequest(prompt=TOKENS[:5].tolist(), num_samples=1, params=params))
        threading.Event().wait(0.05)
        second = engine.sample(SampleRequest(prompt=TOKENS[:7].tolist(), num_samples=1, params=params))
        assert len(first.result().sequences[0].tokens) == 2 and len(second.result().sequences[0].tokens) == 2
        assert engine.sampler.stats["prefill_passes"] - prefills == 1
    finally:
        scheduler.admit_quiet_s, scheduler.admit_max_s = quiet, most


def test_rows_of_different_adapters_decode_together_as_they_would_alone(engine, tmp_path, decode_path):
    refs = []
    for i, rank in enumerate((4, 8)):
        name = f"mix{i}"
        engine.create_adapter(name, LoraSpec(rank=rank, seed=i)).result()
        for _ in range(2):
            train(engine, name, [datum(TOKENS[i:])])
            engine.optim_step(name, AdamParams(learning_rate=2e-2)).result()
        engine.save_adapter(name, str(tmp_path / name), False, f"key-{name}").result()
        refs.append(AdapterRef(f"key-{name}", str(tmp_path / name)))
    refs.append(None)  # base-model rows in the same step

    def request(ref):
        return SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=2, adapter=ref,
                             params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))

    alone = [engine.sample(request(ref)).result() for ref in refs]
    gate = threading.Event()
    blocker = engine.run_on_engine_thread(gate.wait)
    together = [engine.sample(request(ref)) for ref in refs]
    gate.set()
    blocker.result()
    for solo, mixed in zip(alone, together, strict=True):
        for a, b in zip(solo.sequences, mixed.result().sequences, strict=True):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert alone[0].sequences[0].tokens != alone[2].sequences[0].tokens or alone[0].sequences[0].logprobs != alone[2].sequences[0].logprobs


def test_sampled_logprobs_equal_scoring_the_same_tokens_with_an_adapter(engine, tmp_path):
    """Decode (grouped LoRA, prepacked weights on CPU) and a full scoring pass (per-module
    LoRA, plain matmuls) agree on the logprobs of the tokens a trained adapter sampled."""
    engine.create_adapter("agree", LoraSpec(rank=8, seed=3, train_unembed=True)).result()
    for _ in range(3):
        train(engine, "agree", [datum()])
        engine.optim_step("agree", AdamParams(learning_rate=3e-2)).result()
    engine.save_adapter("agree", str(tmp_path / "agree"), False, "key-agree").result()
    ref = AdapterRef("key-agree", str(tmp_path / "agree"))
    prompt = TOKENS[:6].tolist()
    sampled = engine.sample(SampleRequest(prompt=prompt, num_samples=3, adapter=ref,
                                          params=SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))).result()
    for seq in sampled.sequences:
        scored = engine.sample(SampleRequest(prompt=prompt + seq.tokens, num_samples=1, adapter=ref, prompt_logprobs=True,
                                             params=SamplingParams(max_tokens=0))).result()
        np.testing.assert_allclose(scored.prompt_logprobs[len(prompt):], seq.logprobs, atol=1e-3)
    base = engine.sample(SampleRequest(prompt=prompt + sampled.sequences[0].tokens, num_samples=1, prompt_logprobs=True,
                                       params=SamplingParams(max_tokens=0))).result()
    assert np.max(np.abs(np.array(base.prompt_logprobs[len(prompt):]) - sampled.sequences[0].logprobs)) > 1e-2


def test_in_flight_weights_are_a_copy_and_a_request_runs_on_the_newest_version(engine, tmp_path):
    """publish_inflight copies the adapter's weights into the engine's memory (no file): training
    after it does not reach them; a later publish serves requests that named the older
    version too, and each request carries the version it ran on. Dropping the adapter drops them."""
    engine.create_adapter("live", LoraSpec(rank=8, seed=4)).result()
    v1 = AdapterRef("inflight:live#1", "", inflight_of="live", version=1)
    engine.publish_inflight("live", v1).result()

    def score(ref: AdapterRef) -> tuple[list[float], AdapterRef]:
        request = SampleRequest(prompt=TOKENS.tolist(), num_samples=1, adapter=ref, prompt_logprobs=True,
                                params=SamplingParams(max_tokens=0))
        return engine.sample(request).result().prompt_logprobs[1:], request.adapter

    first, ran_on = score(v1)
    assert ran_on == v1
    for _ in range(2):
        train(engine, "live", [datum()])
        engine.optim_step("live", AdamParams(learning_rate=5e-2)).result()
    np.testing.assert_array_equal(score(v1)[0], first)  # trained since, not published: still version 1
    v2 = AdapterRef("inflight:live#2", "", inflight_of="live", version=2)
    engine.publish_inflight("live", v2).result()
    second, ran_on = score(v1)  # a client of version 1 now runs on version 2
    assert ran_on == v2
    assert np.max(np.abs(np.array(second) - np.array(first))) > 1e-2
    engine.save_adapter("live", str(tmp_path / "live"), False, "key-live").result()
    np.testing.assert_allclose(second, score(AdapterRef("key-live", str(tmp_path / "live")))[0], atol=1e-6)
    engine.drop_adapter("live").result()
    with pytest.raises(UserError, match="in-flight weights of live are gone"):
        score(v2)


def test_the_model_loads_on_the_engine_thread_and_load_errors_reach_the_caller(model_dir, tmp_path, monkeypatch):
    """All of the engine's tensor work runs on its one thread, loading included: a second
    thread running OpenMP regions (the caller's) makes every small parallel op of a decode
    step wait for a sleeping worker on a 2-core machine."""
    from tinkerd.engine.model import LlamaModel

    loaded_on = []
    real_load = LlamaModel.load

    def recording_load(*args, **kwargs):
        loaded_on.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(LlamaModel, "load", recording_load)
    eng = InProcessEngine("loads-here", model_dir, device="cpu")
    try:
        assert loaded_on == ["engine-loads-here"]
        assert eng.info.vocab_size > 0  # the constructor returns once the model is loaded
    finally:
        eng.shutdown()
    with pytest.raises(FileNotFoundError):
        InProcessEngine("missing", tmp_path / "no-such-model", device="cpu")


def test_a_request_that_fails_inside_a_shared_batch_fails_alone(engine):
    """One request's bad values (here sent past the core's checks, straight to the engine) must
    not fail the other requests of its prefill pass or decode steps."""
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    alone = engine.sample(SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=2, params=params)).result()

    def sink_that_fails_on_the_second_token(event):
        if len(seen := sink_that_fails_on_the_second_token.tokens) == 1:
            raise RuntimeError("the client's token sink failed")
        seen.append(event.token)

    sink_that_fails_on_the_second_token.tokens = []
    gate = threading.Event()
    blocker = engine.run_on_engine_thread(gate.wait)  # hold the engine so every request shares one batch
    good = [engine.sample(SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=2, params=params)) for _ in range(3)]
    out_of_vocabulary = engine.sample(SampleRequest(prompt=[1, 10**6, 2], num_samples=1, params=params))
    huge_top_k = engine.sample(SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=1, params=params,
                                             topk_sample_logprobs=10**6, topk_prompt_logprobs=10**6, prompt_logprobs=True))
    failing_sink = engine.sample(SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=1, params=params),
                                 on_token=sink_that_fails_on_the_second_token)
    gate.set()
    blocker.result()
    for f in good:
        assert [s.tokens for s in f.result(timeout=120).sequences] == [s.tokens for s in alone.sequences]
    with pytest.raises(IndexError):
        out_of_vocabulary.result(timeout=120)
    with pytest.raises(RuntimeError, match="token sink"):
        failing_sink.result(timeout=120)
    # Past the vocabulary, top-k means the whole vocabulary: served, not a failure of the batch.
    result = huge_top_k.result(timeout=120)
    assert len(result.sequences[0].topk_ids[0]) == engine.info.vocab_size
    # The engine keeps serving.
    assert engine.sample(SampleRequest(prompt=TOKENS[:6].tolist(), num_samples=2, params=params)).result().sequences[0].tokens \
        == alone.sequences[0].tokens


def value_dependent_loss(logprobs, flag):
    """Fine on the dry run at validation (zero logprobs index row 0), but on real logprobs a
    datum whose flag is set indexes one past its last row."""
    index = ((logprobs < -1e-6) & (flag > 0)).sum()
    return -logprobs[index], {}


def test_a_custom_loss_that_fails_on_its_values_fails_its_own_call_alone(engine):
    """Another user's call in the same batch is served as if alone, and the failing run's
    gradients are as before its call (part of it ran in an earlier pass of the batch)."""
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    from tinkerd.loss_graph import CustomLossError, parse_loss

    handle = trace_loss(value_dependent_loss, {"logprobs": 1, "flag": 1}, "sess")
    graph = parse_loss(handle.name, [i.model_dump() for i in handle.inputs], json.loads(encode_graph(handle).model_dump_json()))
    for name, seed in (("steady", 5), ("steady-alone", 5), ("picky", 6)):
        engine.create_adapter(name, LoraSpec(rank=4, seed=seed)).result()
    steady_data = [datum(np.roll(TOKENS, i)) for i in range(2)]
    alone = train(engine, "steady-alone", steady_data)
    train(engine, "picky", [datum()])  # picky accumulates: it has gradients before its custom call
    picky_before = gradients(engine, "picky")

    def flagged(flag: float) -> Datum:
        return Datum(tokens=TOKENS[:-1], inputs={"target_tokens": TOKENS[1:],
                                                 "flag": np.full(len(TOKENS) - 1, flag, np.float32)})

    trainer = engine.trainer
    budget = trainer.train_pass_tokens
    gate = threading.Event()
    blocker = engine.run_on_engine_thread(gate.wait)  # both calls queued: they share the batch
    try:
        trainer.train_pass_tokens = len(TOKENS) - 1  # one row per pass: picky's first row trains, its second fails
        steady = engine.forward_backward(ForwardBackwardCall("steady", steady_data, "cross_entropy", {}, False))
        picky = engine.forward_backward(ForwardBackwardCall("picky", [flagged(0.0), flagged(1.0)], "custom",
                                                            {"graph": graph}, False))
        gate.set()
        blocker.result()
        with pytest.raises(CustomLossError, match="node 'getitem'.*out of bounds"):
            picky.result(timeout=120)
        result = steady.result(timeout=120)
    finally:
        trainer.train_pass_tokens = budget
    assert result.metrics["loss:sum"] == pytest.approx(alone.metrics["loss:sum"], rel=1e-5)
    for name, grad in gradients(engine, "steady-alone").items():
        assert_same_gradient(gradients(engine, "steady")[name], grad)
    after = gradients(engine, "picky")
    assert after.keys() == picky_before.keys()
    for name, grad in picky_before.items():
        assert torch.equal(after[name], grad), name
    # The engine keeps training, the failed run included.
    assert train(engine, "picky", [datum()]).metrics["loss:sum"] > 0
