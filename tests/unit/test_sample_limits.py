"""Every size a sample request controls is bounded by `core/sampling.check`, before the engine
allocates anything for it, with a message naming the field and the limit."""

from __future__ import annotations

import pytest

from tinkerd.core.sampling import MAX_SAMPLED_TOKENS, MAX_TOPK_ENTRIES, MAX_TOPK_LOGPROBS, check
from tinkerd.types import ModelInfo, SampleRequest, SamplingParams, UserError

INFO = ModelInfo(name="m", model_dir="", max_context=32768, vocab_size=50000, eos_token_ids=(0,))


def request(prompt_len: int = 10, n: int = 1, max_tokens: int | None = 16, **extra) -> SampleRequest:
    return SampleRequest(prompt=[1] * prompt_len, num_samples=n, params=SamplingParams(max_tokens=max_tokens), **extra)


@pytest.mark.parametrize("field, value", [("topk_prompt_logprobs", MAX_TOPK_LOGPROBS + 1),
                                          ("topk_sample_logprobs", 10**6), ("topk_sample_logprobs", -1)])
def test_top_k_sizes_are_bounded(field, value):
    with pytest.raises(UserError, match=f"between 0 and {MAX_TOPK_LOGPROBS}") as info:
        check(INFO, request(**{field: value}))
    assert info.value.field == field
    assert check(INFO, request(**{field: MAX_TOPK_LOGPROBS})).params.max_tokens == 16


def test_top_k_is_bounded_by_a_small_vocabulary_too():
    small = ModelInfo(name="m", model_dir="", max_context=1024, vocab_size=100, eos_token_ids=(0,))
    with pytest.raises(UserError, match="between 0 and 100"):
        check(small, request(topk_sample_logprobs=101))


@pytest.mark.parametrize("last_n", [-1, -10**12])
def test_negative_prompt_logprobs_last_n_is_refused(last_n):
    with pytest.raises(UserError, match=">= 0") as info:
        check(INFO, request(prompt_logprobs=True, prompt_logprobs_last_n=last_n))
    assert info.value.field == "prompt_logprobs_last_n"
    assert check(INFO, request(prompt_logprobs=True, prompt_logprobs_last_n=10**12)).prompt_logprobs_last_n == 10**12


def test_samples_times_max_tokens_is_bounded():
    n = 128
    fits = MAX_SAMPLED_TOKENS // n
    assert check(INFO, request(n=n, max_tokens=fits)).params.max_tokens == fits
    with pytest.raises(UserError, match=f"128 samples x {fits + 1} tokens is more than {MAX_SAMPLED_TOKENS}") as info:
        check(INFO, request(n=n, max_tokens=fits + 1))
    assert info.value.field == "max_tokens"
    # Absent, max_tokens is what the context and the total allow: never a refusal.
    assert check(INFO, request(n=n, max_tokens=None)).params.max_tokens == fits
    assert check(INFO, request(n=1, max_tokens=None)).params.max_tokens == INFO.max_context - 10


def test_top_k_entries_of_a_request_are_bounded():
    k = MAX_TOPK_LOGPROBS
    fits = MAX_TOPK_ENTRIES // (8 * k)
    assert check(INFO, request(n=8, max_tokens=fits, topk_sample_logprobs=k)).params.max_tokens == fits
    with pytest.raises(UserError, match=f"more than {MAX_TOPK_ENTRIES} top-k entries") as info:
        check(INFO, request(n=8, max_tokens=fits + 1, topk_sample_logprobs=k))
    assert info.value.field == "topk_sample_logprobs"
    with pytest.raises(UserError, match=f"more than {MAX_TOPK_ENTRIES} top-k entries") as info:
        check(INFO, request(prompt_len=MAX_TOPK_ENTRIES // k + 1, topk_prompt_logprobs=k, prompt_logprobs=True))
    assert info.value.field == "topk_prompt_logprobs"
