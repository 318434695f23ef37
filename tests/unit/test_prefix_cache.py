"""Prompt-prefix reuse in the sampler (docs/engine.md §4.8): a prompt that begins like a
recent one of the same weights is prefilled from where they part, and gives the tokens and
logprobs it gives when computed whole; the cache never crosses weights and stays within its
memory bound."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

import tinkerd.engine.sampler as sampler_module
import tiny_models
from tinkerd.engine.model import LoraWeights, lora_module_paths
from tinkerd.engine.prefix_cache import BLOCK, MIN_HIT_TOKENS, PrefixCache
from tinkerd.engine.sampler import AdapterCache, Cancellations, PendingSample, Sampler
from tinkerd.types import AdapterRef, SampleRequest, SampleResult, SamplingParams

VOCAB = 320
ATOL = 1e-4  # fp32: the same arithmetic, in passes of other shapes


@pytest.fixture(scope="module")
def model():
    return tiny_models.tinkerd_model(tiny_models.build("llama3", VOCAB))


def random_adapter(model, seed: int) -> LoraWeights:
    """An adapter whose B is not zero, so that it changes every projection's output."""
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for path in lora_module_paths(model.cfg, True, True, True):
        fan_in, fan_out = model.cfg.lora_shape(path)
        a[path] = torch.randn(4, fan_in, generator=gen) * 0.3
        b[path] = torch.randn(fan_out, 4, generator=gen) * 0.3
    return LoraWeights(a=a, b=b, scale=1.0)


def make_sampler(model, prefix_cache_bytes: int | None = None) -> Sampler:
    adapters = AdapterCache(8, model.device, model.dtype)
    for key, seed in (("adapter-a", 1), ("adapter-b", 2)):
        adapters.put(key, random_adapter(model, seed))
    return Sampler(model, None, adapters, Cancellations(), kv_budget_bytes=64 * 2**20, prefix_cache_bytes=prefix_cache_bytes)


def request(prompt: list[int], adapter: str | None = None, n: int = 1, seed: int | None = None, temperature: float = 0.0,
            **kwargs) -> SampleRequest:
    ref = AdapterRef(adapter, "/nonexistent") if adapter else None  # served from the adapter cache, never read
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=seed, ignore_eos=True)
    return SampleRequest(prompt=prompt, num_samples=n, params=params, adapter=ref, **kwargs)


def run(sampler: Sampler, *requests: SampleRequest) -> list[SampleResult]:
    """The requests admitted in one round (as the scheduler does when they arrive together),
    decoded to the end."""
    pending = [PendingSample(r, Future()) for r in requests]
    with torch.inference_mode():
        waiting = sampler.admit(pending)
        assert not waiting
        while sampler.rows:
            sampler.decode_step()
    return [item.future.result(timeout=0) for item in pending]


def prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


def assert_same_samples(got: SampleResult, want: SampleResult) -> None:
    assert len(got.sequences) == len(want.sequences)
    for g, w in zip(got.sequences, want.sequences, strict=True):
        assert g.tokens == w.tokens
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=ATOL, rtol=0)


# -- the sampler ------------------------------------------------------------------------------


def test_a_prompt_from_the_cache_samples_as_one_computed_whole(model):
    cached, whole = make_sampler(model), make_sampler(model, prefix_cache_bytes=0)
    system = prompt(1, 70)
    turn1 = system + prompt(2, 9)
    turn2 = turn1 + prompt(3, 21)  # a conversation sent again with one more turn
    asks = [
        request(turn1),
        request(turn1, n=3, seed=11, temperature=1.0),  # the same prompt again: all of it but its last token
        request(turn2),
        request(turn2, seed=5, temperature=0.9, adapter="adapter-a"),  # other weights: computed whole
        request(turn2, seed=5, temperature=0.9, adapter="adapter-a"),
    ]
    got = [run(cached, ask)[0] for ask in asks]
    want = [run(whole, ask)[0] for ask in asks]
    assert [r.prompt_cache_hit_tokens for r in got] == [0, len(turn1) - 1, len(turn1), 0, len(turn2) - 1]
    assert [r.prompt_cache_hit_tokens for r in want] == [0] * 5
    for g, w in zip(got, want, strict=True):
        assert_same_samples(g, w)
    computed = sum(len(a.prompt) - r.prompt_cache_hit_tokens for a, r in zip(asks, got, strict=True))
    assert cached.meter.counters["prefill_tokens"] == computed
    assert cached.meter.counters["prefix_cache_hit_tokens"] == sum(r.prompt_cache_hit_tokens for r in got)
    assert whole.meter.counters["prefill_tokens"] == sum(len(a.prompt) for a in asks)


def test_requests_that_arrive_together_start_from_the_first_ones_prompt(model):
    """A group of samples of one prompt sent as separate requests, and prompts that share a
    long start: one computes the shared part, the others go on from its K/V."""
    cached, whole = make_sampler(model), make_sampler(model, prefix_cache_bytes=0)
    shared = prompt(4, 80)
    asks = [request(shared, seed=i, temperature=1.0) for i in range(4)]
    asks += [request(shared + prompt(5 + i, 3 + 7 * i)) for i in range(3)]
    asks.append(request(prompt(9, 40)))  # nothing in common
    got, want = run(cached, *asks), run(whole, *asks)
    hits = [r.prompt_cache_hit_tokens for r in got]
    assert hits == [0, 79, 79, 79, 80, 80, 80, 0]
    for g, w in zip(got, want, strict=True):
        assert_same_samples(g, w)
    assert cached.meter.counters["prefill_tokens"] == sum(len(a.prompt) for a in asks) - sum(hits)


def test_no_reuse_across_weights(model):
    sampler = make_sampler(model)
    text = prompt(6, 64)
    base, a, b = (run(sampler, request(text, adapter=key))[0] for key in (None, "adapter-a", "adapter-b"))
    assert [r.prompt_cache_hit_tokens for r in (base, a, b)] == [0, 0, 0]
    assert a.sequences[0].logprobs != b.sequences[0].logprobs != base.sequences[0].logprobs
    again_b = run(sampler, request(text, adapter="adapter-b"))[0]
    assert again_b.prompt_cache_hit_tokens == len(text) - 1
    assert_same_samples(again_b, b)


def test_a_request_for_prompt_scores_computes_its_whole_prompt(model):
    cached, whole = make_sampler(model), make_sampler(model, prefix_cache_bytes=0)
    text = prompt(7, 48)
    run(cached, request(text))
    scored = request(text, prompt_logprobs=True, topk_prompt_logprobs=2)
    got, want = run(cached, scored)[0], run(whole, scored)[0]
    assert got.prompt_cache_hit_tokens == 0
    assert torch.allclose(torch.tensor(got.prompt_logprobs[1:]), torch.tensor(want.prompt_logprobs[1:]), atol=ATOL, rtol=0)
    assert_same_samples(got, want)


def test_cached_prompt_tokens_do_not_count_against_a_prefill_round(model, monkeypatch):
    monkeypatch.setitem(sampler_module.PREFILL_TOKENS_PER_ROUND, "cpu", 100)
    text = prompt(10, 80)
    for sampler, waits in ((make_sampler(model), 0), (make_sampler(model, prefix_cache_bytes=0), 3)):
        run(sampler, request(text))
        pending = [PendingSample(request(text, seed=i, temperature=1.0), Future()) for i in range(4)]
        with torch.inference_mode():
            assert len(sampler.admit(pending)) == waits  # 80 prompt tokens each, or 1 to compute
            while sampler.rows:
                sampler.decode_step()


def test_the_option_zero_turns_reuse_off(model):
    sampler = make_sampler(model, prefix_cache_bytes=0)
    text = prompt(8, 64)
    assert [run(sampler, request(text))[0].prompt_cache_hit_tokens for _ in range(2)] == [0, 0]
    assert len(sampler.prefix_cache) == 0


# -- the cache structure ----------------------------------------------------------------------


def kv(length: int, fill: float = 0.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (k, v) [kv_heads 2, length, head_dim 4], float32: 64 bytes a token."""
    return [(torch.full((2, length, 4), fill), torch.full((2, length, 4), fill)) for _ in range(layers)]


TOKEN_BYTES = 2 * 2 * 2 * 4 * 4  # layers x (k and v) x heads x dim x 4 bytes


def test_lookup_finds_the_longest_cached_prefix_of_the_same_identity():
    cache = PrefixCache(2**20)
    base = list(range(100, 200))
    cache.insert("w", base[:50], kv(50, 1.0))
    cache.insert("w", base[:40] + [7] * 30, kv(70, 2.0))
    entry, n = cache.lookup("w", base[:45] + [9] * 10)
    assert n == 45 and entry.k[0, 0, 0, 0] == 1.0  # both share 40; the first shares 45 (a part block past 32)
    entry, n = cache.lookup("w", base[:40] + [7] * 30 + [1])
    assert n == 70 and entry.k[0, 0, 0, 0] == 2.0
    assert cache.lookup("w", base[:50]) == (cache.lookup("w", base[:50])[0], 49)  # the last token is always computed
    assert cache.lookup("other weights", base[:50]) == (None, 0)
    assert cache.lookup("w", base[: MIN_HIT_TOKENS - 1] + [5] * 20) == (None, 0)  # too short a start to be worth a pass
    assert cache.lookup("w", [5] + base[1:50]) == (None, 0)


def test_a_longer_prompt_replaces_the_entry_it_extends_and_a_held_prompt_adds_nothing():
    cache = PrefixCache(2**20)
    turn = list(range(3, 3 + 2 * BLOCK + 5))
    cache.insert("w", turn, kv(len(turn)))
    cache.insert("w", turn + [1, 2, 3], kv(len(turn) + 3))
    assert len(cache) == 1 and cache.bytes == (len(turn) + 3) * TOKEN_BYTES
    cache.insert("w", turn, kv(len(turn)))  # held by the longer entry
    assert len(cache) == 1 and cache.lookup("w", turn + [9])[1] == len(turn)


def test_eviction_keeps_memory_within_the_bound_least_recently_used_first():
    entry_bytes = 40 * TOKEN_BYTES
    cache = PrefixCache(3 * entry_bytes + entry_bytes // 2)  # room for three entries
    prompts = [[i] * 40 for i in range(3, 8)]

    def held() -> list[int]:
        return [i for i, p in enumerate(prompts) if cache.cached_length("w", p + [1]) == 40]

    for p in prompts[:3]:
        cache.insert("w", p, kv(40))
    assert held() == [0, 1, 2]
    assert cache.lookup("w", prompts[0] + [1])[1] == 40  # 0 used: 1 is now the least recently used
    cache.insert("w", prompts[3], kv(40))
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert held() == [0, 2, 3]
    cache.insert("w", prompts[4], kv(40))
    assert held() == [0, 3, 4] and cache.evictions == 2 and len(cache) == 3
    assert cache.bytes == 3 * entry_bytes <= cache.max_bytes
    cache.insert("w", [2] * 200, kv(200))  # larger than the whole bound: not kept, nothing evicted
    assert len(cache) == 3 and cache.bytes == 3 * entry_bytes
    assert not PrefixCache(0).enabled
