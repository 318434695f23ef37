"""A Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, Qwen3, Qwen3 MoE) as a tree of small modules.

    LlamaModel
      embed_tokens                 [vocab, hidden]
      layers: N x DecoderLayer
        input_layernorm            RMSNorm
        self_attn: Attention       qkv_proj (q, k, v as one matmul), o_proj;
                                   q_norm, k_norm (Qwen3: RMSNorm of each head)
        post_attention_layernorm   RMSNorm
        mlp: MLP                   gate_up_proj (gate, up as one matmul), down_proj
             or SparseMoe          router and experts (moe.py), in a MoE model's sparse layers
      norm                         RMSNorm
      lm_head                      (the embedding's weight when the config ties them)

What differs between the families is data (config.py): biases, head_dim, q/k norms, the
rotary frequencies (Llama 3.x scales them), experts.

Every projection is a `LoraLinear` (lora.py): the frozen weight plus each batch row's
adapter update. Weight names follow transformers' `LlamaForCausalLM`, so checkpoints load as
they are, and LoRA module paths are PEFT's (`model.layers.3.self_attn.q_proj`, `lm_head`).

One DecoderLayer serves every kind of pass. What differs between kinds is carried by the
object handed down the tree with the activations (`run`):

- `CausalPass`: training, scoring and prefill. Right-padded rows from position 0, causal
  attention within the pass, the same operations as transformers (logits equal its own).
- `DecodeStep`: one new token per row, each at its own position, attending to its span of
  the KV cache. Written for few rows and many steps, where the number of tensor operations
  matters as much as the matmuls: prepacked weights on CPU, in-place residual adds, the
  rotary embedding of q and k heads in three operations, fused RMSNorm.
- `KernelDecodeStep`: a decode step with the float32 CPU kernels (cpu/kernels.c) between
  the matmuls: rotary + cache write + attention in one call, residual add + RMSNorm in one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.cpu import kernels as cpu_kernels
from tinkerd.engine.cpu import packing
from tinkerd.engine.model.config import ModelConfig
from tinkerd.engine.model.kv_cache import KVCache
from tinkerd.engine.model.lora import AdapterBatch, FusedLoraLinear, LoraLinear
from tinkerd.engine.model.module import Module
from tinkerd.engine.model.moe import SparseMoe
from tinkerd.engine.model.weights import load_weights


class RMSNorm(Module):
    """x / sqrt(mean(x²) + eps) * weight. This is the causal passes' form; decode steps use
    torch's fused op or a C kernel with the same weight (`DecodeStep.add_norm`)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of heads x [B, heads, T, D]; cos, sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary embedding's inverse frequencies [head_dim / 2], as transformers computes
    them (for Llama 3.x, with its scaling of long wavelengths)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.llama3_rope
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _linear(weights: dict[str, torch.Tensor], path: str) -> LoraLinear:
    """The projection at `path`, its tensors taken out of `weights`: fused projections copy
    theirs into one, and the loader must not hold the originals beside the copy (a model
    would need twice its size on the way in)."""
    return LoraLinear(path, weights.pop(path + ".weight"), weights.pop(path + ".bias", None))


class Attention(Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]):
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        self.layer = layer  # this layer's slot in the KV cache
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        parts = [_linear(weights, p + name) for name in ("q_proj", "k_proj", "v_proj")]
        self.qkv_proj = FusedLoraLinear(p + "qkv_proj", parts)
        self.o_proj = _linear(weights, p + "o_proj")
        # Qwen3: an RMSNorm of each q and each k head before the rotary embedding.
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(weights[p + "q_norm.weight"], cfg.rms_norm_eps)
            self.k_norm = RMSNorm(weights[p + "k_norm.weight"], cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        if run.decoding:
            # One new token per row, against the cache: q, k and v go on as the one tensor the
            # fused matmul made (the C kernel reads it in place; torch rotates q and k together).
            out = run.attend(self.layer, self.qkv_proj(x, run.adapters, run.packed), self.q_norm, self.k_norm)
        else:
            bsz, seqlen, _ = x.shape
            heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
            if torch.is_grad_enabled():
                # Training: a projection per module (cheaper to differentiate than one matmul and a split).
                q, k, v = (t.view(bsz, seqlen, -1, dim) for t in self.qkv_proj.split(x, run.adapters))
                if self.q_norm is not None:
                    q, k = self.q_norm(q), self.k_norm(k)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                q, k = apply_rotary(q, run.cos, run.sin), apply_rotary(k, run.cos, run.sin)
            else:
                # One matmul, and the rotary embedding of the q and k heads together.
                qkv = self.qkv_proj(x, run.adapters).view(bsz, seqlen, heads + 2 * kv_heads, dim)
                qk = qkv[:, :, : heads + kv_heads]
                if self.q_norm is not None:
                    qk = torch.cat((self.q_norm(qk[:, :, :heads]), self.k_norm(qk[:, :, heads:])), dim=2)
                q, k = apply_rotary(qk.transpose(1, 2), run.cos, run.sin).split((heads, kv_heads), dim=1)
                v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            if run.past is not None:  # a prefill that goes on from a cached prompt prefix
                past_k, past_v = run.past[self.layer]
                k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
            if run.kv_out is not None:  # prefill: the engine copies each layer's K/V into its cache
                run.kv_out.append((k, v))
            if run.mask is not None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=run.mask, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
            out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.o_proj(out, run.adapters, run.packed)


class MLP(Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]):
        super().__init__()
        p = f"model.layers.{layer}.mlp."
        self.gate_up_proj = FusedLoraLinear(p + "gate_up_proj", [_linear(weights, p + "gate_proj"), _linear(weights, p + "up_proj")])
        self.down_proj = _linear(weights, p + "down_proj")

    def forward(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(x, run.adapters, run.packed)
        h = F.silu(gate)
        # In place (one tensor of [tokens, intermediate] less) unless autograd keeps silu's output.
        h = h * up if torch.is_grad_enabled() else h.mul_(up)
        return self.down_proj(h, run.adapters, run.packed)


class DecoderLayer(Module):
    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]):
        super().__init__()
        p = f"model.layers.{layer}."
        self.input_layernorm = RMSNorm(weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, weights)
        self.post_attention_layernorm = RMSNorm(weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg, layer, weights) if cfg.is_moe_layer(layer) else MLP(cfg, layer, weights)

    def forward(self, x: torch.Tensor, h: torch.Tensor, next_norm: RMSNorm, run: Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; h: input_layernorm(x). Returns the stream after this layer
        and `next_norm` of it (the next layer's input_layernorm, or the final norm).

        Each residual add comes with the norm that follows it, because a decode step on CPU
        does the two in one C kernel, one pass over the stream."""
        x, h = run.add_norm(x, self.self_attn(h, run), self.post_attention_layernorm)
        return run.add_norm(x, self.mlp(h, run), next_norm)


class LlamaModel(Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        """`weights` by their transformers names; the projections' tensors are taken out of
        it as they are fused or stacked."""
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = weights["model.embed_tokens.weight"]  # frozen: a plain tensor
        self.layers = nn.ModuleList(DecoderLayer(cfg, layer, weights) for layer in range(cfg.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], cfg.rms_norm_eps)
        self.lm_head = LoraLinear("lm_head", weights.get("lm_head.weight", self.embed_tokens))
        # What follows each layer's residual stream: the next layer's input norm, then the final norm.
        self._next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        self.kernels: cpu_kernels.CpuKernels | None = None  # float32 CPU decode kernels (use_cpu_kernels)
        self.register_buffer("inv_freq", rotary_inv_freq(cfg).to(self.embed_tokens.device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
        cfg_dict = json.loads((model_dir / "config.json").read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        cfg = ModelConfig.from_hf(cfg_dict, gen)
        weights = load_weights(model_dir, device, dtype)  # shard by shard, straight into the engine's dtype
        return cls(cfg, weights)

    # -- entry points --------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, adapters: AdapterBatch | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of a causal pass over right-padded rows."""
        return self.logits(self.hidden_states(tokens, adapters), adapters)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        adapters: AdapterBatch | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_out: list | None = None,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H].

        Without `cache`: a causal pass over right-padded rows starting at position 0
        (training, scoring, prefill; `kv_out` collects each layer's K/V).
        With `past` (each layer's K/V [B, kv_heads, P, head_dim] of the rows' first P tokens,
        no gradients): the rows go on from position P, attending to those P tokens too, and
        `kv_out` collects each layer's K/V of all P + T positions (a prefill after a cached
        prompt prefix).
        With `cache`: a decode step, `tokens` [B, 1] at `positions` [B, 1] (no gradients).
        """
        if cache is not None:
            if positions is None:
                raise ValueError("a decode step needs the rows' positions")
            with torch.inference_mode():
                step = (DecodeStep if self.kernels is None else KernelDecodeStep)(self, adapters, positions, cache)
                return self._layers(F.embedding(tokens[:, 0], self.embed_tokens), step)[:, None]
        bsz, seqlen = tokens.shape
        start = 0 if past is None else past[0][0].shape[2]
        if positions is None:
            positions = torch.arange(start, start + seqlen, device=tokens.device)[None, :].expand(bsz, seqlen)
        x = F.embedding(tokens, self.embed_tokens)
        run = CausalPass(adapters, *self.rotary(positions, x.dtype), kv_out)
        if past is not None:
            # Query i (position start + i) sees every past position and the new ones up to its own.
            run.past = past
            run.mask = torch.arange(start + seqlen, device=tokens.device)[None, :] <= torch.arange(
                start, start + seqlen, device=tokens.device)[:, None]
        return self._layers(x, run)

    def _layers(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        x, h = run.add_norm(x, None, self.layers[0].input_layernorm)
        for layer, next_norm in zip(self.layers, self._next_norms, strict=True):
            x, h = layer(x, h, next_norm, run)
        return h

    def logits(self, hidden: torch.Tensor, adapters: AdapterBatch | None = None, decoding: bool = False) -> torch.Tensor:
        """Unembedding in fp32 (logprobs are compared across sampler and trainer).
        `decoding`: the hidden states of a decode step (may use the packed weights)."""
        return self.lm_head(hidden, adapters, decoding and not torch.is_grad_enabled()).float()

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, D] of `positions` [B, T]."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    # -- the CPU fast path of decode steps -------------------------------------------------

    def pack_for_cpu(self) -> bool:
        """Prepack the projections a decode step uses for oneDNN (fp32 on CPU; cpu/packing.py).
        Costs one more copy of their weights. Returns whether packing is in use (after a
        self-check)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or not packing.available():
            return False
        linears = [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj)]
        linears += [m for layer in self.layers if isinstance(layer.mlp, MLP) for m in (layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        linears.append(self.lm_head)
        try:
            packed = [packing.pack(linear.weight) for linear in linears]
            if not packing.agrees(linears[0].weight, linears[0].bias, packed[0]):  # layer 0's q/k/v
                return False
        except RuntimeError:
            return False
        for linear, weight in zip(linears, packed, strict=True):
            linear.packed = weight
        return True

    def use_cpu_kernels(self) -> bool:
        """Decode steps through the fused C kernels (float32 on CPU only; cpu/kernels.py).
        Returns whether they are in use."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.kernels = cpu_kernels.load()
        return self.kernels is not None


# -- kinds of pass ------------------------------------------------------------------------


class CausalPass:
    """Training, scoring and prefill: rows from position 0, causal attention within the pass.
    The operations are transformers' own, so the logits equal its logits bit for bit."""

    decoding = False
    packed = False

    def __init__(self, adapters: AdapterBatch | None, cos: torch.Tensor, sin: torch.Tensor, kv_out: list | None):
        self.adapters, self.cos, self.sin, self.kv_out = adapters, cos, sin, kv_out
        self.past: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # K/V of positions before the rows'
        self.mask: torch.Tensor | None = None  # [T, P + T], True = attend; with `past`

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x + delta (out of place: autograd may need x), and its norm."""
        if delta is not None:
            x = x + delta
        return x, norm(x)


class DecodeStep:
    """One new token per row (rows 0..B-1 of `cache`), each at its own position: it writes
    its K/V there and attends to the cached span 0..position. Activations are [B, hidden]."""

    decoding = True
    packed = True  # projections use their oneDNN copies where `pack_for_cpu` made them

    def __init__(self, model: LlamaModel, adapters: AdapterBatch | None, positions: torch.Tensor, cache: KVCache):
        cfg = model.cfg
        self.adapters, self.cache = adapters, cache
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.pos = positions[:, 0]
        low, high = (int(v) for v in torch.aminmax(self.pos))
        self.span = high + 1  # attend to cache positions 0..span-1, masked per row
        self.rows = torch.arange(self.pos.shape[0], device=self.pos.device)
        self.same_pos = high if low == high else None  # every row at one position: slices, not scatters
        self.mask = None  # [B, 1, 1, span] (True = attend); None when every row sees it all
        if low != high:
            self.mask = (torch.arange(self.span, device=self.pos.device)[None, :] <= self.pos[:, None])[:, None, None, :]
        cos, sin = model.rotary(positions, model.dtype)  # [B, 1, 1, D]
        # rotate_half(t) * sin == roll(t, D/2) * (sin with its first half negated)
        half = self.head_dim // 2
        self.cos, self.signed_sin = cos[:, 0], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, 0]  # [B, 1, D]

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x += delta in place (the stream is this step's own tensor), and its norm in one op."""
        if delta is not None:
            x.add_(delta)
        return x, F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)

    def attend(self, layer: int, qkv: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> torch.Tensor:
        """qkv [B, (H + 2 KVH) D] → attention output [B, H D]."""
        bsz, heads, kv_heads, dim = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = qkv.view(bsz, heads + 2 * kv_heads, dim)
        norm_heads_in_place(qkv, heads, kv_heads, q_norm, k_norm)
        qk = qkv[:, : heads + kv_heads]
        qk = torch.addcmul(qk * self.cos, qk.roll(dim // 2, dims=-1), self.signed_sin)
        k, v = qk[:, heads:], qkv[:, heads + kv_heads :]
        cache = self.cache
        if self.same_pos is not None:
            cache.k[layer, :bsz, :, self.same_pos] = k
            cache.v[layer, :bsz, :, self.same_pos] = v
        else:
            cache.k[layer, self.rows, :, self.pos] = k
            cache.v[layer, self.rows, :, self.pos] = v
        out = F.scaled_dot_product_attention(  # GQA without copying K/V
            qk[:, :heads, None],
            cache.k[layer, :bsz, :, : self.span],
            cache.v[layer, :bsz, :, : self.span],
            attn_mask=self.mask,
            enable_gqa=True,
        )
        return out.view(bsz, heads * dim)


class KernelDecodeStep(DecodeStep):
    """A decode step through the float32 CPU kernels (cpu/kernels.c): the same math as
    `DecodeStep`, with fewer passes over memory."""

    def __init__(self, model: LlamaModel, adapters: AdapterBatch | None, positions: torch.Tensor, cache: KVCache):
        super().__init__(model, adapters, positions, cache)
        assert model.kernels is not None
        self.kernels = model.kernels
        bsz = positions.shape[0]
        self.cos, self.signed_sin = self.cos.reshape(bsz, self.head_dim), self.signed_sin.reshape(bsz, self.head_dim)
        self.scale = self.head_dim**-0.5

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.kernels.add_rms_norm(x, delta, norm.weight, norm.eps)

    def attend(self, layer: int, qkv: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> torch.Tensor:
        """Rotary of q and k, this step's K/V written to the cache, and attention: one call
        (after Qwen3's q/k head norms, in torch)."""
        qkv = qkv.contiguous()
        norm_heads_in_place(qkv.view(qkv.shape[0], -1, self.head_dim), self.heads, self.kv_heads, q_norm, k_norm)
        return self.kernels.decode_attention(qkv, self.cos, self.signed_sin, self.pos,
                                             self.cache.k[layer], self.cache.v[layer], self.heads, self.scale, self.span)


def norm_heads_in_place(qkv: torch.Tensor, heads: int, kv_heads: int, q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> None:
    """Qwen3's RMSNorm of each q and k head, written over them in qkv [B, H + 2 KVH, D]."""
    if q_norm is None or k_norm is None:
        return
    q, k = qkv[:, :heads], qkv[:, heads : heads + kv_heads]
    q.copy_(F.rms_norm(q, q_norm.weight.shape, q_norm.weight, q_norm.eps))
    k.copy_(F.rms_norm(k, k_norm.weight.shape, k_norm.weight, k_norm.eps))


Pass = CausalPass | DecodeStep
