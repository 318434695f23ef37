"""The sampler's KV cache stays within its memory budget: requests past it wait their turn,
one that could never fit is refused with a message, and a burst's memory goes back."""

from __future__ import annotations

import json

import pytest

import tinkerd.engine.sampler as sampler_module
from tinkerd.engine.client import InProcessEngine
from tinkerd.engine.model import ModelConfig
from tinkerd.types import SampleRequest, SamplingParams, UserError

PROMPT = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1024, 2, 88, 913]
MAX_TOKENS = 12
EXTENT = len(PROMPT) + MAX_TOKENS + 1  # token slots one row may need


def greedy(n: int = 1, max_tokens: int = MAX_TOKENS) -> SampleRequest:
    return SampleRequest(prompt=PROMPT, num_samples=n, params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="module")
def slot_bytes(model_dir) -> int:
    """One token of one row: every layer's K and V, float32 on CPU."""
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def test_requests_past_the_budget_wait_for_rows_to_finish_and_give_the_same_tokens(model_dir, slot_bytes):
    engine = InProcessEngine("budget", model_dir, device="cpu", kv_cache_bytes=2 * EXTENT * slot_bytes)  # two rows at a time
    sampler = engine.sampler
    running: list[int] = []
    step = sampler.decode_step
    sampler.decode_step = lambda: (running.append(len(sampler.rows)), step())[1]
    try:
        assert sampler.kv_slot_bytes == slot_bytes
        want = engine.sample(greedy()).result(timeout=300).sequences[0].tokens  # alone
        results = [f.result(timeout=300) for f in [engine.sample(greedy()) for _ in range(5)]]
        assert [r.sequences[0].tokens for r in results] == [want] * 5
        assert max(running) == 2  # never more rows than the budget holds
        cache = engine.run_on_engine_thread(lambda: sampler._cache).result()
        assert cache is None or cache.cells <= sampler.kv_budget_slots
    finally:
        engine.shutdown()


def test_a_request_that_could_never_fit_is_refused_and_the_others_run(model_dir, slot_bytes):
    engine = InProcessEngine("budget", model_dir, device="cpu", kv_cache_bytes=3 * EXTENT * slot_bytes)
    try:
        too_big, fine = engine.sample(greedy(n=4)), engine.sample(greedy(n=3))
        with pytest.raises(UserError, match="fewer samples or fewer max_tokens") as refused:
            too_big.result(timeout=300)
        assert refused.value.field == "max_tokens"
        assert len(fine.result(timeout=300).sequences) == 3
    finally:
        engine.shutdown()


def test_an_idle_sampler_gives_back_a_burst_s_cache(model_dir, slot_bytes, monkeypatch):
    monkeypatch.setattr(sampler_module, "IDLE_KV_CACHE_BYTES", 0)
    budget = 64 * EXTENT * slot_bytes
    engine = InProcessEngine("burst", model_dir, device="cpu", kv_cache_bytes=budget)
    sampler = engine.sampler
    sizes: list[int] = []
    step = sampler.decode_step
    sampler.decode_step = lambda: (sizes.append(sampler._cache.cells * sampler.kv_slot_bytes), step())[1]
    try:
        engine.sample(greedy(n=8)).result(timeout=300)
        assert max(sizes) > budget // 8  # more than an idle sampler keeps
        assert engine.run_on_engine_thread(lambda: sampler._cache).result() is None
    finally:
        engine.shutdown()
