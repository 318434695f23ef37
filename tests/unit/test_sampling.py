"""Token choice: filters keep the right support, batching never changes a seeded row's token."""

import torch

from tinkerd.engine.sampling import CDF_BLOCK, _inverse_cdf, choose_token, choose_tokens, filter_logits, make_generator
from tinkerd.types import SamplingParams

CPU = torch.device("cpu")


def test_batched_choice_equals_one_row_at_a_time():
    torch.manual_seed(0)
    logits = torch.randn(4, 500)
    params = [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.7, top_k=5),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5),
        SamplingParams(max_tokens=1, temperature=1.3),
    ]
    for seed in range(5):
        batched = choose_tokens(logits, params, [make_generator(seed, i, CPU) for i in range(4)]).tolist()
        single = [
            choose_token(logits[i], p.temperature, p.top_k, p.top_p, make_generator(seed, i, CPU))
            for i, p in enumerate(params)
        ]
        assert batched == single


def test_a_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(3, 300)
    p = SamplingParams(max_tokens=1, temperature=1.0)
    alone = choose_tokens(logits[1:2], [p], [make_generator(42, 0, CPU)]).item()
    together = choose_tokens(logits, [p, p, p], [make_generator(9, 0, CPU), make_generator(42, 0, CPU), make_generator(3, 0, CPU)])
    assert together[1].item() == alone


def test_top_k_and_top_p_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)
    kept_p = torch.isfinite(filter_logits(logits, 1.0, -1, float(probs[0] + 0.01)))
    assert kept_p.tolist() == [True, True, False, False, False]  # smallest prefix reaching top_p
    seen = {choose_tokens(logits[None], [SamplingParams(max_tokens=1, top_k=2)], [make_generator(s, 0, CPU)]).item() for s in range(100)}
    assert seen == {0, 1}


def test_seeded_generators_repeat_and_differ_by_sample_index():
    a = torch.rand(10, generator=make_generator(5, 0, CPU))
    b = torch.rand(10, generator=make_generator(5, 0, CPU))
    c = torch.rand(10, generator=make_generator(5, 1, CPU))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampled_frequencies_follow_the_distribution():
    """Many seeded draws from one row: empirical frequencies match softmax(logits / T),
    masked tokens never appear."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    temperature = 0.8
    draws = 4000
    params = [SamplingParams(max_tokens=1, temperature=temperature)] * draws
    chosen = choose_tokens(logits.expand(draws, -1), params, [make_generator(s, 0, CPU) for s in range(draws)])
    freq = torch.bincount(chosen, minlength=6).double() / draws
    expected = torch.softmax(logits.double() / temperature, -1)
    assert torch.max(torch.abs(freq - expected)).item() < 0.025  # ~4 standard errors at these sizes
    limited = choose_tokens(logits.expand(draws, -1), [SamplingParams(max_tokens=1, top_k=3)] * draws,
                            [make_generator(s, 0, CPU) for s in range(draws)])
    assert set(limited.tolist()) == {0, 1, 2}


def test_inverse_cdf_matches_a_sequential_float64_search():
    """The blocked search picks the same index as the plain definition: the first index whose
    float64 cumulative mass exceeds uniform × total (vocabulary not a multiple of the block)."""
    gen = torch.Generator().manual_seed(3)
    vocab = 3 * CDF_BLOCK + 77
    probs = torch.softmax(torch.randn(64, vocab, generator=gen) * 4, dim=-1)
    uniforms = torch.rand(64, generator=gen, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    want = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(_inverse_cdf(probs, uniforms), want)


def test_inverse_cdf_never_picks_a_zero_probability_entry():
    """Filtered distributions: all mass on one entry (inside a block, at the very last index of a
    partial block, at index 0), uniforms at the ends of [0, 1)."""
    vocab = 2 * CDF_BLOCK + 5
    for index in (0, 700, CDF_BLOCK, vocab - 1):
        probs = torch.zeros(3, vocab)
        probs[:, index] = 1.0
        uniforms = torch.tensor([0.0, 0.5, 1.0 - 2.0**-53], dtype=torch.float64)
        assert _inverse_cdf(probs, uniforms).tolist() == [index] * 3
    probs = torch.zeros(1, vocab)
    probs[0, [3, CDF_BLOCK + 9]] = torch.tensor([0.25, 0.75])
    got = [_inverse_cdf(probs, torch.tensor([u], dtype=torch.float64)).item() for u in (0.0, 0.2499, 0.25, 0.999999)]
    assert got == [3, 3, CDF_BLOCK + 9, CDF_BLOCK + 9]
