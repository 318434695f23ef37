"""Fused float32 CPU kernels for the decode step (cpu_kernels.c), compiled on first use.

The C source ships with the package and is built once per machine with the system C
compiler into a cache directory (`TINKERD_KERNEL_DIR`, default `~/.cache/tinkerd/kernels`),
keyed by the source, the compiler and the CPU's features. Without a compiler, or with
`TINKERD_CPU_KERNELS=0`, `load()` returns None and the model uses its torch path, which
computes the same thing with more, smaller operations.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
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
        self._lora.argtypes = [_i64, _i64, _p, _i64, _p, _p, _p, _p, _i64, _p, _i64, _p, _p, _p, _i64, _i]
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
        """out[row] += that row's adapter update, for rows of several adapters (cpu_kernels.c).

        x [n, in]; `order` int32 [n]: the rows adapter by adapter; `offsets` int32 [G + 1]:
        where each adapter's rows start in `order`; out [n, ≥ every part's output], in place."""
        self._check(x, out)
        n, in_dim = x.shape
        groups = blocks.a.shape[0]
        if (blocks.a.shape[1] != in_dim or out.dim() != 2 or out.shape[0] != n or out.shape[1] < blocks.out_width
                or order.shape != (n,) or offsets.shape != (groups + 1,)
                or any(t.dtype != torch.int32 or not t.is_contiguous() for t in (order, offsets))):
            raise ValueError("lora_grouped: shapes do not match")
        u = torch.empty(n, blocks.a.shape[2])
        status = self._lora(n, in_dim, x.data_ptr(), groups, order.data_ptr(), offsets.data_ptr(),
                            blocks.skip.data_ptr(), blocks.a.data_ptr(), blocks.a.shape[2], u.data_ptr(),
                            len(blocks.b), blocks.part_info.data_ptr(), blocks.pointers, out.data_ptr(), out.shape[1],
                            torch.get_num_threads())
        if status != 0:
            raise ValueError("lora_grouped: arguments rejected")


class LoraBlocks:
    """Several adapters' LoRA weights for a group of projections fused along their output,
    in the layout `lora_grouped` reads (checked once, here).

    a [G, in, R]: every part's A side by side, R padded to a multiple of 16 with zeros;
    b[p] [G, ceil(width / 64), rank, 64]: part p's B (scale folded in), each 64-column
    tile one contiguous run; part_info int64 [P, 4]: (rank from, rank, output from, width);
    skip int32 [G]: 1 for an adapter with no update for these modules."""

    def __init__(self, a: torch.Tensor, b: list[torch.Tensor], part_info: torch.Tensor, skip: torch.Tensor):
        CpuKernels._check(a, *b)
        groups, _, rank_total = a.shape
        info = part_info.tolist()
        if (a.dim() != 3 or rank_total % 16 or part_info.dtype != torch.int64 or part_info.shape != (len(b), 4)
                or not part_info.is_contiguous() or skip.dtype != torch.int32 or skip.shape != (groups,)
                or any(bp.dim() != 4 or bp.shape[0] != groups or bp.shape[2:] != (rank, 64) or bp.shape[1] * 64 < width
                       or r0 + rank > rank_total for bp, (r0, rank, _, width) in zip(b, info, strict=True))):
            raise ValueError("LoraBlocks: shapes do not match")
        self.a, self.b, self.part_info, self.skip = a, b, part_info, skip
        self.out_width = max((o0 + width for _, _, o0, width in info), default=0)
        self.pointers = (ctypes.c_void_p * max(len(b), 1))(*[bp.data_ptr() for bp in b])


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
