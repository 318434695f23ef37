"""Prompt K/V kept across sample requests, so a prompt that begins like a recent one is
prefilled from where they part (docs/engine.md §4.8).

RL samples many completions of one prompt, often as separate requests, and a multi-turn
rollout sends its growing conversation again at every turn. The sampler stores each
prefilled prompt's K/V here under (weights identity, tokens) and, for a new prompt, takes
the longest prefix it holds of the same weights: only the rest of the prompt is computed.

Lookups go by blocks of BLOCK tokens: a chained hash of each block and all before it
indexes the entries holding that prefix, so finding the longest cached prefix costs one
dictionary probe per block, then a token comparison to confirm it (a hash never decides
alone) and to extend it by the last part block. The memory held is bounded; the least
recently used entries go first. Runs on the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per lookup step
MIN_HIT_TOKENS = 32  # a shorter common prefix is computed again (a pass of its own would cost more)


@dataclass(eq=False)
class PrefixEntry:
    """One prompt's K/V under one weights identity: k, v [layers, kv_heads, len(tokens), head_dim]."""

    identity: Hashable
    tokens: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor
    index_keys: list[tuple] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def _block_keys(identity: Hashable, tokens: Sequence[int]) -> list[tuple]:
    """The index key of each whole block of `tokens`: (identity, blocks, chained hash)."""
    keys, chained = [], 0
    for b in range(len(tokens) // BLOCK):
        chained = hash((chained, tuple(tokens[b * BLOCK : (b + 1) * BLOCK])))
        keys.append((identity, b + 1, chained))
    return keys


class PrefixCache:
    """Prompt K/V by (weights identity, token prefix), within `max_bytes`, LRU out.

    `identity` must name the exact weights the K/V was computed with (the base model, or an
    adapter and its version): K/V of one set of weights is wrong for any other.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # by id(entry), least recently used first
        self._index: dict[tuple, dict[int, PrefixEntry]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _longest(self, identity: Hashable, tokens: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `tokens` and the length of that prefix."""
        candidates: dict[int, PrefixEntry] = {}
        blocks = 0
        for key in _block_keys(identity, tokens):
            found = self._index.get(key)
            if not found:
                break
            candidates, blocks = found, key[1]
        tokens = tuple(tokens)
        m = blocks * BLOCK
        best, best_len = None, 0
        for entry in candidates.values():
            if entry.tokens[:m] != tokens[:m]:
                continue  # a hash collision: not this entry
            # Past the whole blocks, the entries may still agree with the prompt for a part block.
            matched, n = m, min(len(entry.tokens), len(tokens))
            while matched < n and entry.tokens[matched] == tokens[matched]:
                matched += 1
            if matched > best_len:
                best, best_len = entry, matched
        return best, best_len

    def cached_length(self, identity: Hashable, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the cache holds, marking nothing used."""
        return self._longest(identity, tokens)[1]

    def lookup(self, identity: Hashable, tokens: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """(entry, n): the first n tokens' K/V are in `entry` (positions 0..n-1). n leaves at
        least the prompt's last token to compute (its logits give the first sampled token) and
        is 0, with no entry, below MIN_HIT_TOKENS."""
        if not self.enabled:
            return None, 0
        entry, n = self._longest(identity, tokens)
        n = min(n, len(tokens) - 1)
        if entry is None or n < MIN_HIT_TOKENS:
            return None, 0
        self._entries.move_to_end(id(entry))
        return entry, n

    def insert(self, identity: Hashable, tokens: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a prompt's K/V: each layer's (k, v) [kv_heads, len(tokens), head_dim], copied
        (they are views of a whole pass). An entry this prompt extends is replaced by it; a
        prompt an entry already holds only marks that entry used."""
        if not self.enabled or len(tokens) < MIN_HIT_TOKENS:
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        covering, n = self._longest(identity, tokens)
        if covering is not None and n == len(tokens):
            self._entries.move_to_end(id(covering))
            return
        if covering is not None and n == len(covering.tokens):
            self._remove(covering)  # its prompt begins this one: the new entry serves every lookup it would
        entry = PrefixEntry(identity, tuple(tokens), torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]))
        entry.index_keys = _block_keys(identity, entry.tokens)
        for key in entry.index_keys:
            self._index.setdefault(key, {})[id(entry)] = entry
        self._entries[id(entry)] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._entries.values())))
            self.evictions += 1

    def _remove(self, entry: PrefixEntry) -> None:
        del self._entries[id(entry)]
        self.bytes -= entry.nbytes
        for key in entry.index_keys:
            holders = self._index.get(key)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._index[key]

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._remove(entry)

