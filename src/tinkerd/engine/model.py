"""A Llama-family decoder with multi-adapter LoRA and a slot-based KV cache.

One frozen base model is shared by every tenant. LoRA adapters are not baked into the
weights: each projection adds the low-rank update of the adapter that owns each batch
row (rows are grouped into contiguous segments per adapter), so one forward pass can
mix rows of many adapters — for training and for sampling alike.

The weight names follow Hugging Face's `LlamaForCausalLM` so checkpoints load as they
are and LoRA module names match PEFT's (`model.layers.3.self_attn.q_proj`, `lm_head`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinkerd.engine import cpu_kernels

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict, generation_cfg: dict | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"architecture {archs} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise UnsupportedModelError(f"rope type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        num_heads = cfg["num_attention_heads"]
        eos: list[int] = []
        for source in (cfg, generation_cfg or {}):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                value = [value]
            for token in value or []:
                if token not in eos:
                    eos.append(token)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", "Qwen2" in "".join(archs)),
            eos_token_ids=tuple(eos),
        )

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection LoRA can target, by short name."""
        h, i = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "lm_head": (h, self.vocab_size),
        }


@dataclass
class LoraWeights:
    """One adapter: A [r, in] and B [out, r] per module path, plus the LoRA scale alpha/r."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scale: float
    # Decode-kernel copies of the weights (`_adapter_blocks`), for adapters that only serve
    # sampling (their weights never change once loaded).
    kernel_blocks: dict = field(default_factory=dict, repr=False, compare=False)


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


def _onednn_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packed_forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@dataclass
class _Packed:
    """A weight in oneDNN's packed layout (no strides; only `_linear_pointwise` reads it)."""

    packed: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale (one fused op).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _DecodeStep:
    """What every layer of one decode step shares: rows, positions, attended span, mask and
    the rotary tables (cos, and sin with the sign of `rotate_half` folded in)."""

    rows: torch.Tensor
    pos: torch.Tensor
    span: int
    same_pos: int | None  # every row at this position: plain slices instead of scatters
    mask: torch.Tensor | None  # [B, 1, 1, span] (True = attend); None when every row sees it all
    cos: torch.Tensor  # [B, 1, D]
    signed_sin: torch.Tensor  # [B, 1, D]

    @classmethod
    def of(cls, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> _DecodeStep:
        """`positions` [B, 1]; `cos`, `sin` [B, 1, 1, D], the rotary tables of those positions."""
        pos = positions[:, 0]
        low, high = (int(v) for v in torch.aminmax(pos))
        span = high + 1
        rows = torch.arange(pos.shape[0], device=pos.device)
        mask = None
        if low != high:
            mask = (torch.arange(span, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cls(rows, pos, span, high if low == high else None, mask, cos[:, 0], signed_sin[:, 0])


def _fuse_projections(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q/k/v and gate/up of each layer as one weight (one matmul instead of three or two).

    The per-module names stay, as views into the fused tensor, so checkpoints, LoRA
    module paths and anything reading a single projection see the usual layout.
    """
    for layer in range(cfg.num_layers):
        for prefix, parts, fused in (
            (f"model.layers.{layer}.self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            (f"model.layers.{layer}.mlp.", ("gate_proj", "up_proj"), "gate_up_proj"),
        ):
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part in parts]
                if not all(n in weights for n in names):
                    continue
                whole = torch.cat([weights[n] for n in names], dim=0)
                weights[f"{prefix}{fused}.{kind}"] = whole
                for n, piece in zip(names, whole.split([weights[n].shape[0] for n in names], dim=0), strict=True):
                    weights[n] = piece
    return weights


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


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.w = _fuse_projections(cfg, weights)  # plain dict: frozen, never part of autograd
        self.packed: dict[str, _Packed] = {}  # oneDNN copies for CPU (pack_for_cpu)
        self._decoding = False  # inside a decode step: projections may use `packed`
        self.kernels: cpu_kernels.CpuKernels | None = None  # fused fp32 CPU decode kernels (use_cpu_kernels)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq.to(next(iter(weights.values())).device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.w["model.embed_tokens.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["model.embed_tokens.weight"].dtype

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
        cfg_dict = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        cfg = ModelConfig.from_hf(cfg_dict, gen)
        weights: dict[str, torch.Tensor] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(f"no .safetensors weights in {model_dir}")
        for f in files:
            for name, tensor in load_file(str(f)).items():
                weights[name] = tensor.to(device=device, dtype=dtype)
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return cls(cfg, weights)

    # -- building blocks ---------------------------------------------------------------

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, D]

    def _base_linear(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """x @ W.T (+ b) for a frozen base projection (q/k/v and gate/up are fused)."""
        weight, bias = self.w[path + ".weight"], self.w.get(path + ".bias")
        holder = self.packed.get(path) if self._decoding else None
        if holder is None:
            return F.linear(x, weight, bias)
        return _packed_forward(x, holder.packed, bias)

    def _linear(self, x: torch.Tensor, path: str, adapters: AdapterBatch | None) -> torch.Tensor:
        y = self._base_linear(x, path)
        return adapters.apply(y, x, path) if adapters is not None else y

    def pack_for_cpu(self) -> bool:
        """Prepack every frozen projection for oneDNN (fp32 on CPU), used by decode steps only:
        a step reads the weights in the layout the kernel wants instead of repacking them on
        every call, which is what makes small-batch matmuls slow on CPU. Costs one more copy
        of the projection weights. Training, prefill and prompt scoring keep `F.linear`, whose
        results equal transformers' bit for bit; a decode step's logprobs differ from them by
        float32 rounding (~1e-4). Returns whether packing is in use (after a self-check)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or not _onednn_available():
            return False
        try:
            packed = {}
            for name, weight in self.w.items():
                if not name.endswith(".weight") or "norm" in name or "embed_tokens" in name:
                    continue
                if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                    continue  # served through the fused qkv_proj / gate_up_proj
                packed[name[: -len(".weight")]] = _Packed(torch.ops.mkldnn._reorder_linear_weight(weight))
            probe = torch.randn(3, self.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
            path = "model.layers.0.self_attn.qkv_proj"
            want = F.linear(probe, self.w[path + ".weight"], self.w.get(path + ".bias"))
            got = _packed_forward(probe, packed[path].packed, self.w.get(path + ".bias"))
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return False
        except (RuntimeError, KeyError):
            return False
        self.packed = packed
        return True

    def use_cpu_kernels(self) -> bool:
        """Decode steps through the fused C kernels (float32 on CPU only; cpu_kernels.py).
        Returns whether they are in use."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.kernels = cpu_kernels.load()
        return self.kernels is not None

    def _attention(
        self,
        layer: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        adapters: AdapterBatch | None,
        kv_out: list | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        bsz, seqlen, _ = x.shape
        p = f"model.layers.{layer}.self_attn."
        q_out, kv_out_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if not torch.is_grad_enabled():
            # Inference: one matmul for q/k/v, their LoRA updates through `apply_fused`,
            # and the rotary embedding on the query and key heads together.
            qkv = self._base_linear(x, p + "qkv_proj")
            if adapters is not None:
                paths = (p + "q_proj", p + "k_proj", p + "v_proj")
                qkv = adapters.apply_fused(qkv, x, paths, (q_out, kv_out_dim, kv_out_dim))
            qk, v = qkv.split((q_out + kv_out_dim, kv_out_dim), dim=-1)
            qk = qk.reshape(bsz, seqlen, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split((cfg.num_heads, cfg.num_kv_heads), dim=1)
        else:
            # Training: per-module projections (cheaper to differentiate than split + cat).
            q = self._linear(x, p + "q_proj", adapters).view(bsz, seqlen, cfg.num_heads, cfg.head_dim).transpose(1, 2)
            k = self._linear(x, p + "k_proj", adapters).view(bsz, seqlen, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            v = self._linear(x, p + "v_proj", adapters)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        v = v.reshape(bsz, seqlen, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seqlen, q_out)
        return self._linear(out, p + "o_proj", adapters)

    def _mlp(self, layer: int, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        if not torch.is_grad_enabled():
            gate_up = self._base_linear(x, p + "gate_up_proj")
            if adapters is not None:
                size = self.cfg.intermediate_size
                gate_up = adapters.apply_fused(gate_up, x, (p + "gate_proj", p + "up_proj"), (size, size))
            gate, up = gate_up.chunk(2, dim=-1)
        else:  # training: per-module projections (cheaper to differentiate than split + cat)
            gate, up = self._linear(x, p + "gate_proj", adapters), self._linear(x, p + "up_proj", adapters)
        return self._linear(F.silu(gate) * up, p + "down_proj", adapters)

    # -- entry points --------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,
        adapters: AdapterBatch | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_out: list | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H].

        Without `cache`: a causal pass over right-padded rows starting at position 0
        (training, scoring, prefill; `kv_out` collects each layer's K/V).
        With `cache`: a decode step, `tokens` [B, 1] at `positions` [B, 1] (no gradients).
        """
        if cache is not None:
            if positions is None:
                raise ValueError("a decode step needs the rows' positions")
            with torch.inference_mode():
                return self._decode_hidden(tokens, positions, cache, adapters)
        cfg = self.cfg
        bsz, seqlen = tokens.shape
        if positions is None:
            positions = torch.arange(seqlen, device=tokens.device)[None, :].expand(bsz, seqlen)
        x = F.embedding(tokens, self.w["model.embed_tokens.weight"])
        cos, sin = self._rope(positions, x.dtype)
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}."
            h = _rms_norm(x, self.w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            x = x + self._attention(layer, h, cos, sin, adapters, kv_out)
            h = _rms_norm(x, self.w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            x = x + self._mlp(layer, h, adapters)
        return _rms_norm(x, self.w["model.norm.weight"], cfg.rms_norm_eps)

    def _decode_hidden(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, adapters: AdapterBatch | None
    ) -> torch.Tensor:
        """One new token per row (rows 0..B-1 of `cache`), each at its own position.

        The same math as the causal pass, written for the few-rows-many-steps case, where
        the number of tensor operations matters as much as the matmuls: fused q/k/v and
        gate/up projections (prepacked on CPU), rotary embedding of q and k heads in three
        operations, fused RMSNorm with its weight, in-place residual adds, and the fused
        attention kernel over each row's cached span (GQA without copying K/V).
        """
        cfg = self.cfg
        bsz = tokens.shape[0]
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_dim = heads * dim, kv_heads * dim
        eps, norm_shape = cfg.rms_norm_eps, (cfg.hidden_size,)
        step = _DecodeStep.of(positions, *self._rope(positions, self.dtype))
        w = self.w
        x = F.embedding(tokens[:, 0], w["model.embed_tokens.weight"])  # [B, H]
        self._decoding = True
        try:
            if self.kernels is not None:
                return self._decode_layers_fused(x, step, cache, adapters)[:, None]
            for layer in range(cfg.num_layers):
                p = f"model.layers.{layer}."
                h = F.rms_norm(x, norm_shape, w[p + "input_layernorm.weight"], eps)
                qkv = self._base_linear(h, p + "self_attn.qkv_proj")
                if adapters is not None:
                    paths = (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
                    qkv = adapters.apply_fused(qkv, h, paths, (q_out, kv_dim, kv_dim))
                qkv = qkv.view(bsz, heads + 2 * kv_heads, dim)
                qk = qkv[:, : heads + kv_heads]
                # rotate_half(t) * sin == roll(t, D/2) * (sin with its first half negated)
                qk = torch.addcmul(qk * step.cos, qk.roll(dim // 2, dims=-1), step.signed_sin)
                k, v = qk[:, heads:], qkv[:, heads + kv_heads :]
                if step.same_pos is not None:
                    cache.k[layer, :bsz, :, step.same_pos] = k
                    cache.v[layer, :bsz, :, step.same_pos] = v
                else:
                    cache.k[layer, step.rows, :, step.pos] = k
                    cache.v[layer, step.rows, :, step.pos] = v
                attn = F.scaled_dot_product_attention(
                    qk[:, :heads, None],
                    cache.k[layer, :bsz, :, : step.span],
                    cache.v[layer, :bsz, :, : step.span],
                    attn_mask=step.mask,
                    enable_gqa=True,
                ).view(bsz, q_out)
                x.add_(self._linear(attn, p + "self_attn.o_proj", adapters))
                h = F.rms_norm(x, norm_shape, w[p + "post_attention_layernorm.weight"], eps)
                gate_up = self._base_linear(h, p + "mlp.gate_up_proj")
                if adapters is not None:
                    size = cfg.intermediate_size
                    gate_up = adapters.apply_fused(gate_up, h, (p + "mlp.gate_proj", p + "mlp.up_proj"), (size, size))
                gate, up = gate_up.chunk(2, dim=-1)
                x.add_(self._linear(F.silu(gate).mul_(up), p + "mlp.down_proj", adapters))
        finally:
            self._decoding = False
        return F.rms_norm(x, norm_shape, w["model.norm.weight"], eps)[:, None]

    def _decode_layers_fused(
        self, x: torch.Tensor, step: _DecodeStep, cache: KVCache, adapters: AdapterBatch | None
    ) -> torch.Tensor:
        """The layers of `_decode_hidden` with the fused CPU kernels between the matmuls:
        rotary + cache write + attention in one call, each residual add fused with the RMSNorm
        that follows it (the last one with the final norm). Returns the final normed hidden."""
        cfg, w, kern = self.cfg, self.w, self.kernels
        assert kern is not None
        bsz, heads, dim = x.shape[0], cfg.num_heads, cfg.head_dim
        kv_dim, eps, scale = cfg.num_kv_heads * dim, cfg.rms_norm_eps, dim**-0.5
        cos, signed_sin = step.cos.reshape(bsz, dim), step.signed_sin.reshape(bsz, dim)
        h = kern.add_rms_norm(x, None, w["model.layers.0.input_layernorm.weight"], eps)
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}."
            qkv = self._base_linear(h, p + "self_attn.qkv_proj")
            if adapters is not None:
                paths = (p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
                qkv = adapters.apply_fused(qkv, h, paths, (heads * dim, kv_dim, kv_dim))
            attn = kern.decode_attention(qkv.contiguous(), cos, signed_sin, step.pos, cache.k[layer], cache.v[layer],
                                         heads, scale, step.span)
            h = kern.add_rms_norm(x, self._linear(attn, p + "self_attn.o_proj", adapters),
                                  w[p + "post_attention_layernorm.weight"], eps)
            gate_up = self._base_linear(h, p + "mlp.gate_up_proj")
            if adapters is not None:
                size = cfg.intermediate_size
                gate_up = adapters.apply_fused(gate_up, h, (p + "mlp.gate_proj", p + "mlp.up_proj"), (size, size))
            gate, up = gate_up.chunk(2, dim=-1)
            down = self._linear(F.silu(gate).mul_(up), p + "mlp.down_proj", adapters)
            last = layer + 1 == cfg.num_layers
            norm = w["model.norm.weight"] if last else w[f"model.layers.{layer + 1}.input_layernorm.weight"]
            h = kern.add_rms_norm(x, down, norm, eps)
        return h

    def logits(self, hidden: torch.Tensor, adapters: AdapterBatch | None = None, decoding: bool = False) -> torch.Tensor:
        """Unembedding in fp32 (logprobs are compared across sampler and trainer).
        `decoding`: the hidden states of a decode step (may use the packed weights)."""
        self._decoding = decoding and not torch.is_grad_enabled()
        try:
            return self._linear(hidden, "lm_head", adapters).float()
        finally:
            self._decoding = False


def lora_module_paths(cfg: ModelConfig, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    paths = []
    for layer in range(cfg.num_layers):
        if train_attn:
            paths += [f"model.layers.{layer}.self_attn.{m}" for m in ATTN_MODULES]
        if train_mlp:
            paths += [f"model.layers.{layer}.mlp.{m}" for m in MLP_MODULES]
    if train_unembed:
        paths.append("lm_head")
    return paths


def init_lora(
    cfg: ModelConfig, paths: list[str], rank: int, alpha: float, seed: int, device: torch.device
) -> LoraWeights:
    """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a new adapter equals the base."""
    shapes = cfg.lora_shapes()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for path in paths:
        in_features, out_features = shapes[path.rsplit(".", 1)[-1]]
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform with a=sqrt(5) on [r, in]
        a[path] = ((torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound).to(device)
        b[path] = torch.zeros(out_features, rank, device=device)
    return LoraWeights(a=a, b=b, scale=alpha / rank)
