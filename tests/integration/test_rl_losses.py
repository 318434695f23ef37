"""RL losses through the SDK: sampler logprobs feed training, StableReinforce uses provenance."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types
from tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rl_datum(prompt: list[int], seq, advantage: float, with_spans: bool) -> types.Datum:
    """The cookbook's layout: input P + S[:-1], targets P[1:] + S, zeros on prompt positions."""
    tokens = list(seq.tokens)
    p, s = len(prompt), len(tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt + tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": prompt[1:] + tokens,
            "logprobs": [0.0] * (p - 1) + list(seq.logprobs),
            "advantages": [0.0] * (p - 1) + [advantage] * s,
        },
    )
    if not with_spans:
        return datum
    sid = seq.sequence_id
    return datum.with_provenance(
        model_input=[PromptProvenanceSpan(sequence_id=sid, offset=0, length=p), SampledProvenanceSpan(sequence_id=sid, offset=0, length=s - 1)],
        loss_fn_inputs=[PromptProvenanceSpan(sequence_id=sid, offset=1, length=p - 1), SampledProvenanceSpan(sequence_id=sid, offset=0, length=s)],
    )


@pytest.fixture(scope="module")
def rollouts(server, tokenizer):
    sc = tinker.ServiceClient(base_url=server.base_url)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=0)
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True)
    prompt = tokenizer.encode("Q: What is 3 + 4?\nA:")
    res = sampler.sample(types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
    return sc, tc, prompt, res.sequences


@pytest.mark.parametrize("loss_fn, config", [
    ("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("cispo", None), ("dro", {"beta": 0.05}), ("gspo", None), ("stable_reinforce", {"kl_coeff": 0.01}),
])
def test_each_rl_loss_trains_on_its_own_samples(rollouts, loss_fn, config):
    sc, tc, prompt, seqs = rollouts
    advantages = [1.0, -1.0, 0.5, -0.5]
    data = [rl_datum(prompt, s, a, with_spans=True) for s, a in zip(seqs, advantages, strict=True)]
    if loss_fn == "gspo":
        for d, s in zip(data, seqs, strict=True):
            d.loss_fn_inputs["sequence_ratio_mask"] = types.TensorData.from_numpy(
                np.array([0.0] * (len(prompt) - 1) + [1.0] * len(s.tokens), dtype=np.float32))
    out = tc.forward(data, loss_fn, config).result()
    assert np.isfinite(out.metrics["loss:sum"])
    # On-policy: the trainer's logprobs of the sampled tokens equal the sampler's (ratio 1).
    for s, o in zip(seqs, out.loss_fn_outputs, strict=True):
        train_lp = o["logprobs"].to_numpy()[-len(s.tokens):]
        assert np.max(np.abs(train_lp - np.array(s.logprobs))) < 1e-3
    fb = tc.forward_backward(data, loss_fn, config).result()
    assert np.isfinite(fb.metrics["loss:sum"])


def test_stable_reinforce_needs_provenance_of_this_session(rollouts, server):
    sc, tc, prompt, seqs = rollouts
    with pytest.raises(tinker.BadRequestError, match="provenance"):
        tc.forward_backward([rl_datum(prompt, seqs[0], 1.0, with_spans=False)], "stable_reinforce").result()
    # A training client of another session cannot use these samples.
    other = tinker.ServiceClient(base_url=server.base_url).create_lora_training_client(base_model=BASE, rank=4)
    with pytest.raises(tinker.BadRequestError, match="another session"):
        other.forward_backward([rl_datum(prompt, seqs[0], 1.0, with_spans=True)], "stable_reinforce").result()
    # The client is still usable afterwards (the refused seq_ids were consumed).
    out = tc.forward_backward([rl_datum(prompt, seqs[1], 1.0, with_spans=True)], "stable_reinforce").result()
    assert np.isfinite(out.metrics["loss:sum"])
