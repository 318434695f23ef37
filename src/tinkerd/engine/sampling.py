"""Token choice for one sequence: temperature, top-k, top-p, seeded randomness.

Each sequence owns its own `torch.Generator`, so its tokens depend only on its seed and
its own logits — never on what else shares the batch.
"""

from __future__ import annotations

import torch


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


def choose_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    # Exponential race (Gumbel-max equivalent): argmax p_i / E_i with E_i ~ Exp(1).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise).item())


def choose_tokens(logits: torch.Tensor, params: list, generators: list[torch.Generator]) -> torch.Tensor:
    """Token ids [n] for logits [n, V], one row per sequence with its own params and generator.

    Greedy rows (temperature 0) take the argmax. The others sample with the exponential
    race over their filtered distribution; the noise of row i comes only from generators[i].
    """
    n, vocab = logits.shape
    temps = torch.tensor([max(p.temperature, 0.0) for p in params], device=logits.device, dtype=logits.dtype)
    greedy = temps <= 0
    chosen = torch.argmax(logits, dim=-1)
    if bool(greedy.all()):
        return chosen
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
        for i in rows:
            scaled[i] = filter_logits(scaled[i], 1.0, -1, top_ps[i])
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.stack([torch.empty(vocab, device=logits.device, dtype=probs.dtype).exponential_(generator=g) for g in generators])
    sampled = torch.argmax(probs / noise, dim=-1)
    return torch.where(greedy, chosen, sampled)


def make_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) * 1_000_003 + sample_index * 7919) % (2**63 - 1))
    return gen
