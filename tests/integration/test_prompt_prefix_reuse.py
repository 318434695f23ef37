"""Prompt-prefix reuse through the unmodified SDKs: a prompt sent again, or a conversation
sent again with one more turn, reports its cached prompt tokens (the tinker SDK's
SampleResponse.prompt_cache_hit_tokens, OpenAI's usage.prompt_tokens_details.cached_tokens)
and samples exactly as when it was computed whole; `--prefix-cache-mb 0` turns reuse off."""

from __future__ import annotations

import random

import numpy as np
import pytest
import tinker
from openai import OpenAI
from tinker import types

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
GREEDY = types.SamplingParams(max_tokens=5, temperature=0.0)


def own_prompt(seed: int, length: int) -> list[int]:
    """Token ids no other test sends (the shared server's cache holds what they sent)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(length)]


def sample(client, prompt: list[int]) -> types.SampleResponse:
    return client.sample(types.ModelInput.from_ints(prompt), 1, GREEDY).result(timeout=120)


def test_a_prompt_sent_again_is_served_from_the_cache_with_the_same_samples(server):
    client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-test").create_sampling_client(base_model=BASE).result()
    prompt = own_prompt(17, 60)
    first, again = sample(client, prompt), sample(client, prompt)
    assert (first.prompt_cache_hit_tokens, again.prompt_cache_hit_tokens) == (0, len(prompt) - 1)
    assert again.sequences[0].tokens == first.sequences[0].tokens
    np.testing.assert_allclose(again.sequences[0].logprobs, first.sequences[0].logprobs, atol=1e-4, rtol=0)

    turn = prompt + first.sequences[0].tokens + own_prompt(18, 7)  # the conversation with one more turn
    assert sample(client, turn).prompt_cache_hit_tokens == len(prompt)

    oai = OpenAI(base_url=server.base_url + "/oai/api/v1", api_key="tml-test", max_retries=0, timeout=120)
    out = oai.completions.create(model=BASE, prompt=[turn], max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens_details.cached_tokens == len(turn) - 1


@pytest.mark.slow  # a server of its own
def test_reuse_turned_off(start_server):
    srv = start_server(extra_args=["--prefix-cache-mb", "0"])
    client = tinker.ServiceClient(base_url=srv.base_url, api_key="tml-test").create_sampling_client(base_model=BASE).result()
    prompt = own_prompt(19, 60)
    first, again = sample(client, prompt), sample(client, prompt)
    assert (first.prompt_cache_hit_tokens, again.prompt_cache_hit_tokens) == (0, 0)
    assert again.sequences[0].tokens == first.sequences[0].tokens
