"""The sampler's key/value cache: every layer's K and V of the sequences being decoded."""

from __future__ import annotations

import torch

from tinkerd.engine.model.config import ModelConfig


class KVCache:
    """Per-layer K/V for up to `rows` sequences of up to `length` tokens each.

    Active sequences always occupy rows 0..n-1 (the engine compacts on removal), so a
    decode step reads a slice, never a gather.
    """

    def __init__(self, cfg: ModelConfig, rows: int, length: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]

    @property
    def cells(self) -> int:
        """Token slots (rows x length): what the sampler's memory budget counts."""
        return self.rows * self.length

    def resized(self, rows: int, length: int) -> KVCache:
        """A cache of exactly `rows` x `length` holding what fits of this one's contents
        (rows 0..rows-1, positions 0..length-1: where the live rows are)."""
        layers, old_rows, heads, old_length, dim = self.k.shape
        new = KVCache.__new__(KVCache)
        shape = (layers, rows, heads, length, dim)
        new.k = torch.zeros(shape, device=self.k.device, dtype=self.k.dtype)
        new.v = torch.zeros(shape, device=self.v.device, dtype=self.v.dtype)
        r, n = min(rows, old_rows), min(length, old_length)
        new.k[:, :r, :, :n] = self.k[:, :r, :, :n]
        new.v[:, :r, :, :n] = self.v[:, :r, :, :n]
        return new

    def grown(self, rows: int, length: int) -> KVCache:
        """A cache at least this large in both dimensions, holding this one's contents."""
        return self.resized(max(rows, self.rows), max(length, self.length))

    def swap_rows(self, i: int, j: int) -> None:
        rows = torch.tensor([i, j], device=self.k.device)
        self.k[:, [j, i]] = self.k.index_select(1, rows)
        self.v[:, [j, i]] = self.v.index_select(1, rows)

    def move_row(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
