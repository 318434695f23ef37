"""Frozen projection weights prepacked for oneDNN, for float32 decode steps on CPU.

A decode step multiplies a few rows by every weight. At that size a plain `F.linear`
spends much of its time repacking the weight into the layout the matmul kernel reads;
a weight packed once ahead of time skips that on every call. The packed copy costs one
more copy of the projection weights and is read by oneDNN's linear only (it has no
strides). Results differ from `F.linear`'s by float32 rounding (~1e-4), so only decode
steps use it: training, prefill and scoring keep `F.linear`, which matches transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's packed layout (opaque: only `linear` reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias), W given `pack`ed."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def agrees(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor) -> bool:
    """Whether the packed weight computes what `F.linear` does, on a fixed random probe: a
    oneDNN build that packs but miscomputes must not serve decode steps."""
    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return torch.allclose(linear(probe, packed, bias), F.linear(probe, weight, bias), rtol=1e-4, atol=1e-4)
