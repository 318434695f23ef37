"""Multi-adapter LoRA: one frozen base model, many tenants' adapters in one batch.

Adapters are not baked into the weights. Each projection is a `LoraLinear`: the frozen
base matmul plus, for each batch row, the low-rank update of the adapter that owns the
row. `AdapterBatch` says which rows those are (contiguous row segments per adapter), so
one forward pass can mix rows of many adapters, for training and for sampling alike:

- training: every segment's update added in place by one autograd function
  (`_SegmentedLora`), whose backward gives each adapter the gradient of its own rows;
- prefill and scoring (no autograd): the same updates added in place, one addmm each;
- decode steps (`GroupedLora`): rows of several adapters scattered through the batch,
  gathered per adapter into two batched matmuls (or one C call on float32 CPU).

Module paths follow PEFT (`model.layers.3.self_attn.q_proj`, `lm_head`), so adapters
load and save as PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.cpu import kernels as cpu_kernels
from tinkerd.engine.cpu import packing
from tinkerd.engine.model.config import ATTN_MODULES, MLP_MODULES, ModelConfig
from tinkerd.engine.model.module import Module

# -- an adapter -------------------------------------------------------------------------

@dataclass
class LoraWeights:
    """One adapter: A [r, in] and B [out, r] per module path, plus the LoRA scale alpha/r."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scale: float
    # Decode-kernel copies of the weights (`_adapter_blocks`), for adapters that only serve
    # sampling (their weights never change once loaded).
    kernel_blocks: dict = field(default_factory=dict, repr=False, compare=False)


def lora_module_paths(cfg: ModelConfig, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """The PEFT module paths an adapter with these flags trains. In a layer with experts
    (MoE), "MLP" means every expert's projections, each expert with its own A and B; the
    router stays frozen."""
    paths = []
    for layer in range(cfg.num_layers):
        if train_attn:
            paths += [f"model.layers.{layer}.self_attn.{m}" for m in ATTN_MODULES]
        if train_mlp and cfg.is_moe_layer(layer):
            assert cfg.moe is not None
            paths += [f"model.layers.{layer}.mlp.experts.{e}.{m}" for e in range(cfg.moe.num_experts) for m in MLP_MODULES]
        elif train_mlp:
            paths += [f"model.layers.{layer}.mlp.{m}" for m in MLP_MODULES]
    if train_unembed:
        paths.append("lm_head")
    return paths


def init_lora(
    cfg: ModelConfig, paths: list[str], rank: int, alpha: float, seed: int, device: torch.device
) -> LoraWeights:
    """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a new adapter equals the base."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for path in paths:
        in_features, out_features = cfg.lora_shape(path)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform with a=sqrt(5) on [r, in]
        a[path] = ((torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound).to(device)
        b[path] = torch.zeros(out_features, rank, device=device)
    return LoraWeights(a=a, b=b, scale=alpha / rank)


# -- LoRA as a linear layer ---------------------------------------------------------------

class LoraLinear(Module):
    """y = x Wᵀ (+ b) with a frozen W, plus each batch row's LoRA update for module `path`.

    `packed`: W in oneDNN's layout (`cpu.packing`), set by `LlamaModel.pack_for_cpu`; decode
    steps ask for it (`packed=True`), every other pass uses `F.linear`, which matches
    transformers bit for bit.
    """

    def __init__(self, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.path = path
        # Plain tensors, not parameters: the base model is frozen and never part of autograd.
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None, packed: bool = False) -> torch.Tensor:
        y = self.base(x, packed)
        return y if adapters is None else adapters.apply(y, x, self.path)

    def base(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        if packed and self.packed is not None:
            return packing.linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.path!r}, in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"


class FusedLoraLinear(LoraLinear):
    """Several projections of one input (q/k/v, gate/up) as one matmul: their weights
    concatenated along the output, and each module's own LoRA update added to its columns.

    The parts stay `LoraLinear`s of their own, their weights views into the fused one (one
    copy in memory): training uses them, because three matmuls are cheaper to differentiate
    than one matmul and a split. Inference uses the fused matmul.
    """

    def __init__(self, path: str, parts: list[LoraLinear]):
        weight = torch.cat([p.weight for p in parts], dim=0)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in parts])
        super().__init__(path, weight, bias)
        self.sizes = tuple(p.weight.shape[0] for p in parts)
        self.paths = tuple(p.path for p in parts)
        part_biases = bias.split(self.sizes) if bias is not None else [None] * len(parts)
        for part, w, b in zip(parts, weight.split(self.sizes), part_biases, strict=True):
            part.weight, part.bias = w, b if part.bias is not None else None
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None, packed: bool = False) -> torch.Tensor:
        """The fused output [..., sum of sizes]."""
        y = self.base(x, packed)
        return y if adapters is None else adapters.apply_fused(y, x, self.paths, self.sizes)

    def split(self, x: torch.Tensor, adapters: AdapterBatch | None, packed: bool = False) -> tuple[torch.Tensor, ...]:
        """Each part's output: a projection per part when autograd records, else views of the
        fused output."""
        if torch.is_grad_enabled():
            return tuple(part(x, adapters) for part in self.parts)
        return self(x, adapters, packed).split(self.sizes, dim=-1)


# -- which rows use which adapter -----------------------------------------------------------

@dataclass
class AdapterSegment:
    start: int
    end: int
    adapter: LoraWeights | None


@dataclass
class AdapterBatch:
    """Which adapter each batch row uses: contiguous row segments."""

    segments: list[AdapterSegment] = field(default_factory=list)
    grouped: GroupedLora | None = None  # set for scattered decode rows of several adapters

    @classmethod
    def single(cls, adapter: LoraWeights | None, rows: int) -> AdapterBatch:
        return cls([AdapterSegment(0, rows, adapter)])

    def row_groups(self, rows: int, device: torch.device) -> tuple[torch.Tensor | None, list[LoraWeights | None]]:
        """Each of `rows` batch rows' adapter, as (an index per row into a list of adapters,
        that list); the index is None when one adapter (or none) serves every row. A layer
        that regroups tokens (the experts of a MoE layer) finds each token's adapter so."""
        if self.grouped is not None:
            slot_groups = self.grouped.row_slot.div(self.grouped.max_rows, rounding_mode="floor")
            return slot_groups, list(self.grouped.stacks.adapters)
        if len(self.segments) == 1 and (self.segments[0].start, self.segments[0].end) == (0, rows):
            return None, [self.segments[0].adapter]
        groups = torch.full((rows,), len(self.segments), dtype=torch.long)  # rows outside every segment: no adapter
        for i, seg in enumerate(self.segments):
            groups[seg.start : seg.end] = i
        return groups.to(device), [seg.adapter for seg in self.segments] + [None]

    def apply(self, y: torch.Tensor, x: torch.Tensor, path: str) -> torch.Tensor:
        """y (= x @ W.T) plus each row's adapter update for module `path`."""
        if self.grouped is not None:
            return self.grouped.apply(y, x, path)
        if not torch.is_grad_enabled() and y.is_contiguous():
            self._add_in_place(y, x, path)
            return y
        if y.is_contiguous() and not y._is_view() and not (y.is_leaf and y.requires_grad):
            # Training: every segment's update added into the projection's output in place
            # by one autograd function (no per-segment copies and concatenation, whose
            # forward and backward cost ~7 % of a pass of 4 adapters).
            bounds, scales, weights = self._updates(path, x.dtype)
            return _SegmentedLora.apply(y, x, bounds, scales, *weights) if bounds else y
        if len(self.segments) == 1:
            adapter = self.segments[0].adapter
            if adapter is None or path not in adapter.a:
                return y
            return y + _lora_delta(x, adapter, path)
        # split, not slicing: the backward of a split is one cat, while each slice's backward
        # would allocate and zero a tensor of the whole batch's size.
        sizes = [seg.end - seg.start for seg in self.segments]
        parts = []
        for seg, xs, ys in zip(self.segments, x.split(sizes, dim=0), y.split(sizes, dim=0), strict=True):
            if seg.adapter is not None and path in seg.adapter.a:
                ys = ys + _lora_delta(xs, seg.adapter, path)
            parts.append(ys)
        return torch.cat(parts, dim=0)

    def _updates(self, path: str, dtype: torch.dtype) -> tuple[tuple, tuple, list[torch.Tensor]]:
        """The segments with an update for `path`: their (start, end) rows, scales, and
        weights a_0, b_0, a_1, b_1, ... in `dtype`."""
        live = [seg for seg in self.segments if seg.adapter is not None and path in seg.adapter.a]
        weights = [w for seg in live for w in (seg.adapter.a[path].to(dtype), seg.adapter.b[path].to(dtype))]
        return tuple((seg.start, seg.end) for seg in live), tuple(seg.adapter.scale for seg in live), weights

    def _add_in_place(self, y: torch.Tensor, x: torch.Tensor, path: str) -> None:
        """Without autograd (prefill, scoring): y[rows of each segment] += its adapter's update,
        in place, one addmm per segment (no scaled copy, no sum, no concatenation). y is a
        contiguous output or a column slice of one (its rows form one 2-D view)."""
        _add_segments(y, x, *self._updates(path, x.dtype))

    def apply_fused(self, y: torch.Tensor, x: torch.Tensor, paths: tuple[str, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """y, the output of several projections fused along the last dim (sizes), plus each
        row's adapter update for each of `paths` (e.g. q/k/v from one fused matmul)."""
        if self.grouped is not None:
            return self.grouped.apply_fused(y, x, paths, sizes)
        if not any(seg.adapter is not None and any(p in seg.adapter.a for p in paths) for seg in self.segments):
            return y
        parts = y.split(sizes, dim=-1)
        if not torch.is_grad_enabled() and y.is_contiguous():
            for part, path in zip(parts, paths, strict=True):
                self._add_in_place(part, x, path)
            return y
        return torch.cat([self.apply(part, x, path) for part, path in zip(parts, paths, strict=True)], dim=-1)


# -- training and prefill: contiguous segments --------------------------------------------

class _SegmentedLora(torch.autograd.Function):
    """y[rows of segment i] += scale_i · (x A_iᵀ) B_iᵀ, in place, for training passes.

    y [B, ..., out] is the base projection's output (its own backward does not need it, so
    it may be overwritten); x [B, ..., in]; `bounds` the batch rows (start, end) of each
    segment; weights a_0, b_0, a_1, b_1, ... ([r, in], [out, r]). The backward hands y's
    gradient through untouched and computes each segment's from its own rows only, so an
    adapter's gradient comes from its own rows alone, as with one pass per adapter."""

    @staticmethod
    def forward(ctx, y, x, bounds, scales, *weights):  # noqa: ANN001, ANN205 - autograd signature
        us = _add_segments(y, x, bounds, scales, weights)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, *weights, *us)
        ctx.bounds, ctx.scales, ctx.per_row = bounds, scales, math.prod(y.shape[1:-1])  # tokens per batch row
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd signature
        x, *rest = ctx.saved_tensors
        n, per_row = len(ctx.bounds), ctx.per_row
        weights, us = rest[: 2 * n], rest[2 * n :]
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[1]:
            covered = sum(end - start for start, end in ctx.bounds) * per_row
            grad_x = torch.empty_like(x2) if covered == x2.shape[0] else torch.zeros_like(x2)
        grad_weights: list[torch.Tensor | None] = []
        for i, ((start, end), scale) in enumerate(zip(ctx.bounds, ctx.scales, strict=True)):
            a, b, u = weights[2 * i], weights[2 * i + 1], us[i]
            rows = slice(start * per_row, end * per_row)
            g = g2[rows]
            gu = (g @ b).mul_(scale)  # [n, r]
            if grad_x is not None:
                torch.mm(gu, a, out=grad_x[rows])
            grad_weights.append(gu.t() @ x2[rows] if ctx.needs_input_grad[4 + 2 * i] else None)
            grad_weights.append((g.t() @ u).mul_(scale) if ctx.needs_input_grad[5 + 2 * i] else None)
        return grad, None if grad_x is None else grad_x.view_as(x), None, None, *grad_weights


def _add_segments(y: torch.Tensor, x: torch.Tensor, bounds: tuple, scales: tuple, weights: list | tuple) -> list[torch.Tensor]:
    """y[rows start..end of each segment] += scale · (x Aᵀ) Bᵀ, in place, one addmm each;
    weights a_0, b_0, a_1, b_1, ... Returns each segment's x Aᵀ. y [B, ..., out] is contiguous
    or a column slice of a contiguous output (its rows form one 2-D view); x [B, ..., in]."""
    y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
    per_row = math.prod(y.shape[1:-1])  # tokens per batch row
    us = []
    for (start, end), scale, a, b in zip(bounds, scales, weights[0::2], weights[1::2], strict=True):
        u = x2[start * per_row : end * per_row] @ a.t()
        y2[start * per_row : end * per_row].addmm_(u, b.t(), alpha=scale)
        us.append(u)
    return us


def _lora_delta(x: torch.Tensor, adapter: LoraWeights, path: str) -> torch.Tensor:
    a = adapter.a[path].to(x.dtype)
    b = adapter.b[path].to(x.dtype)
    return (x @ a.t()) @ b.t() * adapter.scale



# -- decode steps: rows of several adapters, scattered -------------------------------------

class LoraStacks:
    """Per-module stacks of several adapters' LoRA weights, [G, in, r] and [G, r, out].

    Ranks are padded with zeros (a zero column of A and row of B add nothing) and each
    adapter's scale is folded into B. Built lazily per module and kept while the same set
    of adapters keeps decoding together.
    """

    def __init__(self, adapters: tuple[LoraWeights | None, ...]):
        self.adapters = adapters  # keeps them alive: the cache key is their identity
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._fused: dict[str, FusedStacks | None] = {}
        self._blocks: dict[str, cpu_kernels.LoraBlocks | None] = {}

    def get(self, path: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if path not in self._stacks:
            present = [a for a in self.adapters if a is not None and path in a.a]
            if not present:
                self._stacks[path] = None
            else:
                rank = max(a.a[path].shape[0] for a in present)
                ref_a, ref_b = present[0].a[path], present[0].b[path]
                a_stack = torch.zeros(len(self.adapters), ref_a.shape[1], rank, device=like.device, dtype=like.dtype)
                b_stack = torch.zeros(len(self.adapters), rank, ref_b.shape[0], device=like.device, dtype=like.dtype)
                for g, adapter in enumerate(self.adapters):
                    if adapter is not None and path in adapter.a:
                        r = adapter.a[path].shape[0]
                        a_stack[g, :, :r] = adapter.a[path].t().to(like.dtype)
                        b_stack[g, :r, :] = (adapter.b[path].t() * adapter.scale).to(like.dtype)
                self._stacks[path] = (a_stack, b_stack)
        return self._stacks[path]

    def get_fused(self, paths: tuple[str, ...], sizes: tuple[int, ...], like: torch.Tensor) -> FusedStacks | None:
        """Stacks for projections fused along their output: the A stacks side by side
        [G, in, sum r], so one bmm gives every module's x·A, and each module's B stack with
        the rank columns and output columns it owns (no block-diagonal B: at rank 32 its
        zeros were a third of the adapter memory a decode step reads)."""
        key = "+".join(paths)
        if key not in self._fused:
            parts = [self.get(path, like) for path in paths]
            if all(part is None for part in parts):
                self._fused[key] = None
            else:
                present = [part[0] for part in parts if part is not None]
                a_stack = torch.cat(present, dim=2) if len(present) > 1 else present[0]
                owned = []
                r0, o0 = 0, 0
                for part, size in zip(parts, sizes, strict=True):
                    if part is not None:
                        rank = part[1].shape[1]
                        owned.append((r0, r0 + rank, o0, o0 + size, part[1]))
                        r0 += rank
                    o0 += size
                self._fused[key] = FusedStacks(a_stack, owned)
        return self._fused[key]


    def get_blocks(self, paths: tuple[str, ...], sizes: tuple[int, ...]) -> cpu_kernels.LoraBlocks | None:
        """The same weights as `get_fused`, for the C kernel `lora_grouped`: pointers to each
        adapter's own blocks (`_adapter_blocks`), so no stacked copy is made for this set."""
        key = "+".join(paths)
        if key not in self._blocks:
            per_adapter = [_adapter_blocks(a, paths, sizes) if a is not None else None for a in self.adapters]
            self._blocks[key] = cpu_kernels.LoraBlocks(per_adapter, sizes) if any(per_adapter) else None
        return self._blocks[key]


def _adapter_blocks(adapter: LoraWeights, paths: tuple[str, ...], sizes: tuple[int, ...]) -> cpu_kernels.AdapterBlocks | None:
    """An adapter's weights in the C kernel's layout, built on first use and kept with the
    adapter (a sampler checkpoint's weights never change), whatever set it decodes in."""
    key = "+".join(paths)
    if key not in adapter.kernel_blocks:
        adapter.kernel_blocks[key] = cpu_kernels.AdapterBlocks.build(adapter.a, adapter.b, adapter.scale, paths, sizes)
    return adapter.kernel_blocks[key]


@dataclass
class FusedStacks:
    a: torch.Tensor  # [G, in, sum r]
    parts: list[tuple[int, int, int, int, torch.Tensor]]  # (rank from, to, output from, to, B [G, r, out])


@dataclass
class GroupedLora:
    """Rows of several adapters in one decode step: two batched matmuls per module.

    Rows are gathered into a [G, max_rows] layout (the Punica / S-LoRA idea), so the cost
    per module is a gather, two bmm and a gather back to row order, however many adapters
    share the step. When every row uses one adapter there is nothing to gather: two matmuls.
    With the float32 CPU kernels, one C call per projection does the same (`lora_grouped`:
    it streams each adapter's weights once in a tiled layout; the torch ops above read
    them at about half the memory bandwidth, which made a step of 8 adapters 1.3x one's).
    """

    stacks: LoraStacks
    gather_index: torch.Tensor  # [G * max_rows] row of x for each slot (padding slots repeat row 0)
    row_slot: torch.Tensor  # [rows] the slot holding each row: the inverse of gather_index
    groups: int
    max_rows: int
    kernels: cpu_kernels.CpuKernels | None = None  # float32 CPU: projections through `lora_grouped`
    order: torch.Tensor | None = None  # int32 [rows]: the rows adapter by adapter (for the kernel)
    offsets: torch.Tensor | None = None  # int32 [G + 1]: where each adapter's rows start in `order`

    @classmethod
    def build(
        cls, stacks: LoraStacks, row_groups: list[int], device: torch.device,
        kernels: cpu_kernels.CpuKernels | None = None,
    ) -> GroupedLora:
        members: list[list[int]] = [[] for _ in stacks.adapters]
        for row, g in enumerate(row_groups):
            members[g].append(row)
        max_rows = max(len(m) for m in members)
        gather = [m[i] if i < len(m) else 0 for m in members for i in range(max_rows)]
        row_slot = [0] * len(row_groups)
        for g, m in enumerate(members):
            for i, row in enumerate(m):
                row_slot[row] = g * max_rows + i
        use_kernel = kernels is not None and device.type == "cpu"
        offsets = [0]
        for m in members:
            offsets.append(offsets[-1] + len(m))
        return cls(
            stacks=stacks,
            gather_index=torch.tensor(gather, device=device),
            row_slot=torch.tensor(row_slot, device=device),
            groups=len(members),
            max_rows=max_rows,
            kernels=kernels if use_kernel else None,
            order=torch.tensor([row for m in members for row in m], dtype=torch.int32) if use_kernel else None,
            offsets=torch.tensor(offsets, dtype=torch.int32) if use_kernel else None,
        )

    def apply(self, y: torch.Tensor, x: torch.Tensor, path: str) -> torch.Tensor:
        return self.apply_fused(y, x, (path,), (y.shape[-1],))

    def apply_fused(self, y: torch.Tensor, x: torch.Tensor, paths: tuple[str, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if self.kernels is not None and x.dtype == torch.float32 and y.dtype == torch.float32 and y.is_contiguous():
            # Several adapters, float32 on CPU: one C call streams every adapter's weights once.
            blocks = self.stacks.get_blocks(paths, sizes)
            if blocks is not None:
                self.kernels.lora_grouped(x.reshape(x.shape[0], -1).contiguous(), self.order, self.offsets, blocks,
                                          y.view(y.shape[0], -1))
            return y
        stacked = self.stacks.get_fused(paths, sizes, x)
        return y if stacked is None else self._add(y, x, stacked)

    def _add(self, y: torch.Tensor, x: torch.Tensor, stacked: FusedStacks) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = y.reshape(y.shape[0], -1)  # a copy when y is a strided slice of a fused output
        if self.groups == 1:  # one adapter for every row, in row order: plain matmuls
            u = flat @ stacked.a[0]
            for r0, r1, o0, o1, b in stacked.parts:
                out[:, o0:o1].addmm_(u[:, r0:r1], b[0])
            return out.view(y.shape)
        padded = flat.index_select(0, self.gather_index).view(self.groups, self.max_rows, -1)
        u = torch.bmm(padded, stacked.a)
        slots = self.groups * self.max_rows
        for r0, r1, o0, o1, b in stacked.parts:
            # Back to row order by a gather (each row owns exactly one slot): a scatter-add
            # (index_add_) of the same rows was several times slower on CPU.
            delta = torch.bmm(u[..., r0:r1], b).view(slots, o1 - o0)
            out[:, o0:o1].add_(delta.index_select(0, self.row_slot))
        return out.view(y.shape)
