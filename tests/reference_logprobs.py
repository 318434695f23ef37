"""Logprobs of the same tokens from both sides: tinkerd through the SDK, and a transformers model."""

from __future__ import annotations

from pathlib import Path

import torch
from tinker import types


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001 - any transformers causal LM
    """Next-token logprobs of ids[1:] given their prefixes."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def tinkerd_logprobs(sampler, ids: list[int]) -> torch.Tensor:  # noqa: ANN001 - a tinker SamplingClient
    got = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert got[0] is None
    return torch.tensor(got[1:], dtype=torch.float32)


def load_hf(directory: Path):  # noqa: ANN201 - a transformers model
    """A Hugging Face model directory in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
