"""The sampler's KV cache grows in length while rows decode, instead of reserving max_tokens up front."""

from __future__ import annotations

import pytest

import tinkerd.engine.sampler as sampler_module
from tinkerd.engine.client import InProcessEngine
from tinkerd.engine.model import KVCache
from tinkerd.types import SampleRequest, SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1024, 2, 88, 913]


def test_kv_cache_grows_mid_generation_without_changing_the_tokens(model_dir, monkeypatch):
    engine = InProcessEngine("test", model_dir, device="cpu")
    sampler = engine.sampler
    try:
        def greedy() -> tuple[list[int], list[float]]:
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            seq = engine.sample(SampleRequest(prompt=PROMPT, num_samples=1, params=params)).result(timeout=600).sequences[0]
            return seq.tokens, seq.logprobs

        growths = []
        original = KVCache.resized
        monkeypatch.setattr(KVCache, "resized", lambda self, rows, length: growths.append(length) or original(self, rows, length))
        monkeypatch.setattr(sampler_module, "KV_LENGTH_STEP", 4)
        sampler._cache = KVCache(sampler.cfg, 8, 8, sampler.device, sampler.dtype)  # the engine is idle: tiny on purpose
        grown_tokens, grown_logprobs = greedy()
        assert len(growths) >= 3 and sampler._cache.length < len(PROMPT) + 60 + 1 + 128  # grew step by step

        sampler._cache = KVCache(sampler.cfg, 8, 256, sampler.device, sampler.dtype)  # roomy: no growth
        tokens, logprobs = greedy()
        assert grown_tokens == tokens
        assert grown_logprobs == pytest.approx(logprobs, abs=1e-5)
    finally:
        engine.shutdown()
