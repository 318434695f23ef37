"""A routed mixture of SwiGLU experts (Qwen3 MoE), with LoRA on every expert.

    SparseMoe
      router        [experts, hidden], frozen (a plain tensor, never trained)
      gate_up       [experts, 2 · expert_intermediate, hidden]: each expert's gate and up
      down          [experts, hidden, expert_intermediate]

Each token goes to the `top_k` experts with the highest router softmax, weighted by those
probabilities (renormalised over the chosen ones when the config says `norm_topk_prob`),
as transformers' Qwen3MoeSparseMoeBlock does.

The (token, expert) pairs are sorted once by expert, so each expert runs one matmul over
all of its tokens: the work is grouped by expert, a loop over the experts that have tokens,
never over tokens. Within an expert the pairs are also sorted by the adapter of the row
they came from, so a batch mixing rows of several adapters gives each expert contiguous
segments of tokens per adapter, and the usual segmented LoRA applies (`AdapterBatch`,
lora.py), in training, prefill and decode alike.

LoRA module paths are those of PEFT on a model whose experts are modules of their own
(`model.layers.3.mlp.experts.7.gate_proj`): each expert has its own A and B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinkerd.engine.model.config import MLP_MODULES, ModelConfig, UnsupportedModelError
from tinkerd.engine.model.lora import AdapterBatch, AdapterSegment
from tinkerd.engine.model.module import Module


class SparseMoe(Module):
    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, torch.Tensor]):
        """Takes the experts' weights out of `weights` as it stacks them, so the loader never
        holds two copies of them."""
        super().__init__()
        assert cfg.moe is not None
        moe = cfg.moe
        p = f"model.layers.{layer}.mlp."
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.top_k, moe.norm_topk_prob
        self.intermediate = moe.intermediate_size
        self.router = weights.pop(p + "gate.weight")
        if p + "experts.gate_up_proj" in weights:  # already stacked, as transformers 5 holds them in memory
            self.gate_up, self.down = weights.pop(p + "experts.gate_up_proj"), weights.pop(p + "experts.down_proj")
        else:  # one tensor per expert and projection, as checkpoints on the hub have them
            try:
                self.gate_up = torch.stack([
                    torch.cat([weights.pop(f"{p}experts.{e}.gate_proj.weight"), weights.pop(f"{p}experts.{e}.up_proj.weight")])
                    for e in range(moe.num_experts)
                ])
                self.down = torch.stack([weights.pop(f"{p}experts.{e}.down_proj.weight") for e in range(moe.num_experts)])
            except KeyError as missing:
                raise UnsupportedModelError(f"the weights lack {missing} (config.json: num_experts = {moe.num_experts})") from None
        expected = (moe.num_experts, 2 * moe.intermediate_size, cfg.hidden_size)
        if tuple(self.gate_up.shape) != expected:
            raise UnsupportedModelError(f"layer {layer}: experts' gate/up weights {tuple(self.gate_up.shape)}, expected {expected}")
        self.paths = [tuple(f"{p}experts.{e}.{m}" for m in MLP_MODULES) for e in range(moe.num_experts)]

    def forward(self, x: torch.Tensor, run) -> torch.Tensor:  # noqa: ANN001 - run: llama.Pass
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        tokens = flat.shape[0]
        probs = torch.softmax(F.linear(flat, self.router), dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        top_weights = top_weights.to(flat.dtype)

        groups, adapters = _token_groups(run.adapters, shape[0], tokens // shape[0], flat.device)
        n_groups = len(adapters)
        token_of_pair = torch.arange(tokens, device=flat.device).repeat_interleave(self.top_k)
        key = top_experts.reshape(-1)
        if groups is not None:
            key = key * n_groups + groups[token_of_pair]
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=self.num_experts * n_groups).tolist()  # one host sync per layer
        pair_tokens = token_of_pair[order]
        xs = flat.index_select(0, pair_tokens)

        outs = []
        start = 0
        for expert in range(self.num_experts):
            per_group = counts[expert * n_groups : (expert + 1) * n_groups]
            n = sum(per_group)
            if n:
                outs.append(self._expert(expert, xs[start : start + n], _expert_segments(per_group, adapters)))
                start += n
        ys = torch.cat(outs) * top_weights.reshape(-1)[order, None]
        return flat.new_zeros(flat.shape).index_add(0, pair_tokens, ys).view(shape)

    def _expert(self, expert: int, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        """One expert's SwiGLU over its tokens x [n, hidden], with each segment's LoRA."""
        gate_path, up_path, down_path = self.paths[expert]
        gate_up = F.linear(x, self.gate_up[expert])
        if adapters is not None:
            gate_up = adapters.apply_fused(gate_up, x, (gate_path, up_path), (self.intermediate, self.intermediate))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        h = F.silu(gate) * up
        y = F.linear(h, self.down[expert])
        return y if adapters is None else adapters.apply(y, h, down_path)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, intermediate={self.intermediate}"


def _token_groups(adapters: AdapterBatch | None, rows: int, per_row: int, device: torch.device):
    """(each token's index into the adapter list or None when one serves all, that list)."""
    if adapters is None:
        return None, [None]
    row_groups, members = adapters.row_groups(rows, device)
    if row_groups is None:
        return None, members
    return row_groups.repeat_interleave(per_row), members


def _expert_segments(per_group: list[int], adapters: list) -> AdapterBatch | None:
    """An expert's tokens, sorted by adapter, as contiguous segments that cover them all
    (`per_group`: how many of its tokens each adapter has); None when no adapter is among them."""
    segments, start = [], 0
    for count, adapter in zip(per_group, adapters, strict=True):
        if count:
            segments.append(AdapterSegment(start, start + count, adapter))
        start += count
    return AdapterBatch(segments) if any(seg.adapter is not None for seg in segments) else None
