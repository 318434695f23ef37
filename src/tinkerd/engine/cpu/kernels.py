"""Fused float32 CPU kernels for the decode step (kernels.c), compiled on first use.

The C source ships with the package and is built once per machine with the system C
compiler into a cache directory (`TINKERD_KERNEL_DIR`, default `~/.cache/tinkerd/kernels`),
keyed by the source, the compiler and the CPU's features. Without a compiler, or with
`TINKERD_CPU_KERNELS=0`, `load()` returns None and the model uses its torch path, which
computes the same thing with more, smaller operations.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]  # no-trapping-math: vectorised clamps

_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode() + _cpu_features().encode()).hexdigest()[:16]
    root = Path(os.environ.get("TINKERD_KERNEL_DIR") or Path.home() / ".cache" / "tinkerd" / "kernels")
    target = root / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


class CpuKernels:
    """ctypes bindings; every method checks what the C code assumes (float32, CPU, contiguous)."""

    def __init__(self, lib: ctypes.CDLL):
        self._attention = lib.decode_attention
        self._attention.argtypes = [_i, _i, _i, _i, _p, _p, _p, _p, _p, _p, _i64, _i64, _f, _p, _i]
        self._attention.restype = None
        self._rms = lib.add_rms_norm
        self._rms.argtypes = [_i, _i, _p, _p, _p, _f, _p, _i]
        self._rms.restype = None
        self._lora = lib.lora_grouped
        self._lora.argtypes = [_i64, _i64, _p, _i64, _p, _p, _p, _p, _i64, _p, _i64, _p, _p, _p, _p, _p, _i64, _i]
        self._lora.restype = _i

    @staticmethod
    def _check(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("CPU kernels take contiguous float32 CPU tensors")

    def decode_attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        pos: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        heads: int,
        scale: float,
        span: int,
    ) -> torch.Tensor:
        """qkv [B, (H + 2 KVH) D]; cos, signed_sin [B, D]; pos [B] int64, all < `span`;
        k/v_cache one layer's [rows ≥ B, KVH, L ≥ span, D]. Writes this step's K/V; returns [B, H D]."""
        bsz, kv_heads, length, dim = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        self._check(qkv, cos, signed_sin)
        if (qkv.shape[0] > bsz or qkv.shape[1] != (heads + 2 * kv_heads) * dim or k_cache.shape != v_cache.shape
                or k_cache.stride() != v_cache.stride() or k_cache.stride()[2:] != (dim, 1) or heads % kv_heads
                or pos.dtype != torch.int64 or not pos.is_contiguous() or pos.shape != (qkv.shape[0],) or span > length):
            raise ValueError("decode_attention: shapes do not match")
        rows = qkv.shape[0]
        out = torch.empty(rows, heads * dim)
        self._attention(rows, heads, kv_heads, dim, qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), pos.data_ptr(),
                        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), scale,
                        out.data_ptr(), torch.get_num_threads())
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta (in place, when given); returns RMSNorm(x) * weight. x, delta [B, N]."""
        self._check(x, weight, *([delta] if delta is not None else []))
        if x.dim() != 2 or weight.shape != (x.shape[1],) or (delta is not None and delta.shape != x.shape):
            raise ValueError("add_rms_norm: shapes do not match")
        out = torch.empty_like(x)
        self._rms(x.shape[0], x.shape[1], x.data_ptr(), delta.data_ptr() if delta is not None else None,
                  weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
        return out

    def lora_grouped(self, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, blocks: LoraBlocks,
                     out: torch.Tensor) -> None:
        """out[row] += that row's adapter update, for rows of several adapters (kernels.c).

        x [n, in]; `order` int32 [n]: the rows adapter by adapter; `offsets` int32 [G + 1]:
        where each adapter's rows start in `order`; out [n, ≥ every part's output], in place."""
        self._check(x, out)
        n, in_dim = x.shape
        groups = blocks.groups
        if (blocks.in_dim not in (None, in_dim) or out.dim() != 2 or out.shape[0] != n
                or out.shape[1] < blocks.out_width or order.shape != (n,) or offsets.shape != (groups + 1,)
                or any(t.dtype != torch.int32 or not t.is_contiguous() for t in (order, offsets))):
            raise ValueError("lora_grouped: shapes do not match")
        u = torch.empty(n, blocks.u_cols)
        status = self._lora(n, in_dim, x.data_ptr(), groups, order.data_ptr(), offsets.data_ptr(), blocks.a_ptrs,
                            blocks.a_cols.data_ptr(), blocks.u_cols, u.data_ptr(), blocks.parts,
                            blocks.part_info.data_ptr(), blocks.b_ptrs, blocks.b_r0.data_ptr(), blocks.b_rank.data_ptr(),
                            out.data_ptr(), out.shape[1], torch.get_num_threads())
        if status != 0:
            raise ValueError("lora_grouped: arguments rejected")


@dataclass
class AdapterBlocks:
    """One adapter's LoRA weights for projections fused along their output (q/k/v, gate/up,
    or one module), in the layout `lora_grouped` reads. Built once per adapter: any set of
    adapters decoding together points at these, so a set that changes copies nothing.

    a [in, R]: the A of every module present, side by side, R padded to a multiple of 16;
    parts[p]: (rank from, rank, B [ceil(width / 64), rank, 64] with the scale folded in,
    each 64-column tile one contiguous run), or None where the adapter lacks module p."""

    a: torch.Tensor
    parts: list[tuple[int, int, torch.Tensor] | None]

    @classmethod
    def build(cls, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float, paths: tuple[str, ...],
              sizes: tuple[int, ...]) -> AdapterBlocks | None:
        """From PEFT-shaped A [r, in] and B [out, r] per module path; None if no path is present."""
        present = [path for path in paths if path in a]
        if not present:
            return None
        ranks = [a[path].shape[0] if path in a else 0 for path in paths]
        in_dim, cols = a[present[0]].shape[1], -(-sum(ranks) // 16) * 16
        tiles = [-(-size // 64) for size in sizes]
        # One allocation, in the order the kernel reads it: A, then each part's B tiles.
        buffer = torch.zeros(in_dim * cols + sum(t * r * 64 for t, r in zip(tiles, ranks, strict=True)))
        a_blocks = buffer[: in_dim * cols].view(in_dim, cols)
        parts: list[tuple[int, int, torch.Tensor] | None] = []
        r0, at = 0, in_dim * cols
        for path, size, rank, count in zip(paths, sizes, ranks, tiles, strict=True):
            if not rank:
                parts.append(None)
                continue
            a_blocks[:, r0 : r0 + rank] = a[path].t().float()
            padded = torch.zeros(count * 64, rank)
            padded[:size] = b[path].float() * scale
            tiled = buffer[at : at + count * rank * 64].view(count, rank, 64)
            tiled.copy_(padded.view(count, 64, rank).transpose(1, 2))
            parts.append((r0, rank, tiled))
            r0, at = r0 + rank, at + count * rank * 64
        return cls(a_blocks, parts)


class LoraBlocks:
    """The adapters of one decode step, for one fused projection: pointers to each adapter's
    `AdapterBlocks` (None: no update, e.g. base-model rows), checked once, here."""

    def __init__(self, adapters: list[AdapterBlocks | None], sizes: tuple[int, ...]):
        groups, parts = len(adapters), len(sizes)
        present = [blk for blk in adapters if blk is not None]
        CpuKernels._check(*[blk.a for blk in present], *[part[2] for blk in present for part in blk.parts if part])
        in_dims = {blk.a.shape[0] for blk in present}
        if len(in_dims) > 1 or any(blk.a.shape[1] % 16 or len(blk.parts) != parts for blk in present):
            raise ValueError("LoraBlocks: the adapters' shapes do not match")
        b_ptrs, b_r0, b_rank = [0] * (parts * groups), [0] * (parts * groups), [0] * (parts * groups)
        for g, blk in enumerate(adapters):
            for p, part in enumerate(blk.parts if blk is not None else []):
                if part is None:
                    continue
                r0, rank, tiled = part
                if tiled.shape != (-(-sizes[p] // 64), rank, 64) or r0 + rank > blk.a.shape[1]:
                    raise ValueError("LoraBlocks: a B block does not match its module")
                b_ptrs[p * groups + g], b_r0[p * groups + g], b_rank[p * groups + g] = tiled.data_ptr(), r0, rank
        self.adapters = adapters  # keeps the tensors behind the pointers alive
        self.groups, self.parts = groups, parts
        self.in_dim = next(iter(in_dims)) if in_dims else None
        self.a_ptrs = (ctypes.c_void_p * max(groups, 1))(*[blk.a.data_ptr() if blk else None for blk in adapters])
        self.a_cols = torch.tensor([blk.a.shape[1] if blk else 0 for blk in adapters], dtype=torch.int64)
        self.u_cols = int(self.a_cols.max()) if groups else 0
        self.b_ptrs = (ctypes.c_void_p * max(parts * groups, 1))(*[ptr or None for ptr in b_ptrs])
        self.b_r0 = torch.tensor(b_r0, dtype=torch.int64)
        self.b_rank = torch.tensor(b_rank, dtype=torch.int64)
        starts = [0, *itertools.accumulate(sizes)]  # each part's first output column
        self.part_info = torch.tensor(list(zip(starts[:-1], sizes, strict=True)), dtype=torch.int64).reshape(-1, 2)
        self.out_width = starts[-1]


@cache
def load() -> CpuKernels | None:
    """The compiled kernels, or None (disabled, no compiler, or the build failed)."""
    if os.environ.get("TINKERD_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.info("no C compiler found: decode steps use the torch path")
        return None
    try:
        return CpuKernels(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.CalledProcessError, AttributeError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        log.warning("CPU kernels unavailable (%s): decode steps use the torch path", str(detail).strip()[:500])
        return None
