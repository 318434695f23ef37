"""Token choice for one sequence: temperature, top-k, top-p, seeded randomness.

Each sequence owns its own `torch.Generator`, so its tokens depend only on its seed and
its own logits — never on what else shares the batch. A sampled token costs one uniform
draw per sequence (inverse CDF over the filtered distribution), not one per vocabulary
entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [V] of the distribution actually sampled from (masked entries are -inf)."""
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _uniform(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand((), generator=generator, device=device, dtype=torch.float64)


CDF_BLOCK = 1024


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of probs [n, V] with the row's uniform in [0, 1): the first
    index whose cumulative mass exceeds uniform × (the row's total).

    Two levels, in float64: the cumulative mass of blocks of `CDF_BLOCK` entries picks a
    block, then the cumulative sum inside that block picks the entry. (A float64 cumsum over
    the whole [n, V] costs ~10× more: it converts and writes n × V doubles.) The target
    inside the block is kept below the block's own total, so the chosen entry always has
    non-zero probability.
    """
    n, vocab = probs.shape
    blocks_n = -(-vocab // CDF_BLOCK)
    pad = blocks_n * CDF_BLOCK - vocab
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(n, blocks_n, CDF_BLOCK)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [n, blocks]
    target = uniforms.to(torch.float64) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True)[:, 0].clamp_(max=blocks_n - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(n, device=probs.device), block].double().cumsum(-1)  # [n, CDF_BLOCK]
    rest = torch.minimum(target - before, inner[:, -1] * (1 - 2.0**-40))
    entry = torch.searchsorted(inner, rest[:, None], right=True)[:, 0].clamp_(max=CDF_BLOCK - 1)
    return (block * CDF_BLOCK + entry).clamp_(max=vocab - 1)


def choose_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """The one-row reference `choose_tokens` must agree with."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(_inverse_cdf(probs[None], _uniform(generator, logits.device)[None]).item())


def choose_tokens(logits: torch.Tensor, params: list, generators: list[torch.Generator]) -> torch.Tensor:
    """Token ids [n] for logits [n, V], one row per sequence with its own params and generator.

    Greedy rows (temperature 0) take the argmax. The others draw from their filtered
    distribution by inverse CDF; the uniform of row i comes only from generators[i].
    """
    n, vocab = logits.shape
    temps = torch.tensor([max(p.temperature, 0.0) for p in params], device=logits.device, dtype=logits.dtype)
    greedy = temps <= 0
    any_greedy = bool(greedy.any())
    if any_greedy and bool(greedy.all()):
        return torch.argmax(logits, dim=-1)
    scaled = logits
    if any(p.temperature != 1.0 for p in params):
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if min(top_ks) < vocab:
        kth = torch.topk(scaled, max(k for k in top_ks if k < vocab), dim=-1).values
        index = torch.tensor([min(k, kth.shape[1]) - 1 for k in top_ks], device=logits.device)
        threshold = kth.gather(-1, index[:, None])
        limited = torch.tensor([k < vocab for k in top_ks], device=logits.device)[:, None]
        scaled = scaled.masked_fill(limited & (scaled < threshold), float("-inf"))
    if min(top_ps) < 1.0:
        rows = [i for i, p in enumerate(top_ps) if p < 1.0]
        if scaled is logits:
            scaled = logits.clone()  # rows are filtered in place; the caller's logits stay as they are
        for i in rows:
            scaled[i] = filter_logits(scaled[i], 1.0, -1, top_ps[i])
    probs = torch.softmax(scaled, dim=-1)
    uniforms = torch.stack([_uniform(g, logits.device) for g in generators])
    drawn = _inverse_cdf(probs, uniforms)
    return torch.where(greedy, torch.argmax(logits, dim=-1), drawn) if any_greedy else drawn


def make_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) * 1_000_003 + sample_index * 7919) % (2**63 - 1))
    return gen
