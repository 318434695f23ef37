"""The fused CPU decode kernels against the torch operations they replace."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from tinkerd.engine.cpu import kernels as cpu_kernels

B, H, KVH, D = 5, 9, 3, 64


def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([positions.float()[:, None] * inv] * 2, dim=-1)
    return emb.cos(), emb.sin()


def test_decode_attention_matches_rotary_cache_write_and_masked_sdpa(c_kernels):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=gen)
    pos = torch.tensor([0, 7, 31, 12, 7])
    span = int(pos.max()) + 1
    k_cache, v_cache = torch.randn(B + 2, KVH, 40, D, generator=gen), torch.randn(B + 2, KVH, 40, D, generator=gen)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    cos, sin = rotary(pos)
    signed_sin = torch.cat([-sin[:, : D // 2], sin[:, D // 2 :]], dim=-1)
    got = c_kernels.decode_attention(qkv, cos, signed_sin, pos, k_cache, v_cache, H, D**-0.5, span)

    heads = qkv.view(B, H + 2 * KVH, D)
    rotate = lambda t: torch.cat([-t[..., D // 2 :], t[..., : D // 2]], dim=-1)  # noqa: E731
    qk = heads[:, : H + KVH] * cos[:, None] + rotate(heads[:, : H + KVH]) * sin[:, None]
    rows = torch.arange(B)
    want_k[rows, :, pos] = qk[:, H:]
    want_v[rows, :, pos] = heads[:, H + KVH :]
    mask = (torch.arange(span)[None] <= pos[:, None])[:, None, None]
    want = F.scaled_dot_product_attention(qk[:, :H, None], want_k[:B, :, :span], want_v[:B, :, :span], attn_mask=mask,
                                          enable_gqa=True).reshape(B, H * D)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(k_cache, want_k, atol=1e-6, rtol=1e-6)  # rows past B untouched too
    assert torch.equal(v_cache, want_v)


def test_add_rms_norm_adds_in_place_and_normalises(c_kernels):
    gen = torch.Generator().manual_seed(1)
    x, delta, weight = torch.randn(B, 576, generator=gen), torch.randn(B, 576, generator=gen), torch.randn(576, generator=gen)
    start = x.clone()
    out = c_kernels.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, start + delta, atol=0, rtol=0)
    torch.testing.assert_close(out, F.rms_norm(start + delta, (576,), weight, 1e-5), atol=1e-5, rtol=1e-5)
    again = c_kernels.add_rms_norm(x, None, weight, 1e-5)
    torch.testing.assert_close(x, start + delta, atol=0, rtol=0)
    torch.testing.assert_close(again, out, atol=0, rtol=0)


def test_wrong_inputs_are_refused_not_read_out_of_bounds(c_kernels):
    qkv = torch.randn(2, (H + 2 * KVH) * D)
    cache = torch.zeros(2, KVH, 8, D)
    cos = torch.ones(2, D)
    with pytest.raises(ValueError):  # span beyond the cache
        c_kernels.decode_attention(qkv, cos, cos, torch.tensor([3, 9]), cache, cache.clone(), H, 0.125, 10)
    with pytest.raises(ValueError):  # float64
        c_kernels.add_rms_norm(torch.zeros(2, 4, dtype=torch.float64), None, torch.ones(4, dtype=torch.float64), 1e-5)


def test_without_a_working_compiler_the_torch_path_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("TINKERD_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        monkeypatch.delenv("CC")
        monkeypatch.setenv("TINKERD_CPU_KERNELS", "0")
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()
