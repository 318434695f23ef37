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

    def grown(self, rows: int, length: int) -> KVCache:
        """A larger cache holding this one's contents."""
        cfg_shape = self.k.shape
        new = KVCache.__new__(KVCache)
        shape = (cfg_shape[0], max(rows, cfg_shape[1]), cfg_shape[2], max(length, cfg_shape[3]), cfg_shape[4])
        new.k = torch.zeros(shape, device=self.k.device, dtype=self.k.dtype)
        new.v = torch.zeros(shape, device=self.v.device, dtype=self.v.dtype)
        new.k[:, : cfg_shape[1], :, : cfg_shape[3]] = self.k
        new.v[:, : cfg_shape[1], :, : cfg_shape[3]] = self.v
        return new

    def move_row(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
