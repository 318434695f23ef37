"""The model's kinds of pass against each other, on a tiny random model of each family
(tests/tiny_models.py): a decode step through the C kernels against the torch decode step,
and decode steps against the causal pass they continue, with rows of several adapters."""

from __future__ import annotations

import pytest
import torch

import tiny_models
from tinkerd.engine.model import (
    AdapterBatch,
    AdapterSegment,
    GroupedLora,
    KVCache,
    LlamaModel,
    LoraStacks,
    init_lora,
    lora_module_paths,
)


def tiny_model(family: str = "qwen2") -> LlamaModel:
    return tiny_models.tinkerd_model(tiny_models.build(family, vocab_size=128))


def adapter(model: LlamaModel, seed: int, rank: int):
    weights = init_lora(model.cfg, lora_module_paths(model.cfg, True, True, True), rank, 16.0, seed, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for path in weights.b:
        weights.b[path] = torch.randn(weights.b[path].shape, generator=gen) * 0.1
    return weights


def test_the_fused_projections_hold_one_copy_of_the_weights():
    model = tiny_model()
    attn = model.layers[0].self_attn
    q, k, v = attn.qkv_proj.parts
    assert q.weight.data_ptr() == attn.qkv_proj.weight.data_ptr() and q.bias.data_ptr() == attn.qkv_proj.bias.data_ptr()
    assert torch.equal(torch.cat([q.weight, k.weight, v.weight]), attn.qkv_proj.weight)
    assert [p.path for p in (q, k, v)] == [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]


def decode_run(model: LlamaModel, kernels, rows: list, prompts: torch.Tensor, starts: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill row r with prompts[r, :starts[r]], then decode `steps` tokens (the prompt's own)."""
    model.kernels = kernels
    cache = KVCache(model.cfg, len(rows), 16, model.device, model.dtype)
    adapters = list({id(a): a for a in rows}.values())  # the distinct adapters (None: base rows)
    stacks = LoraStacks(tuple(adapters))
    group = [[id(a) for a in adapters].index(id(a)) for a in rows]
    with torch.inference_mode():
        for r, (adapter_r, start) in enumerate(zip(rows, starts, strict=True)):
            kv: list = []
            model.hidden_states(prompts[r : r + 1, :start], AdapterBatch.single(adapter_r, 1), kv_out=kv)
            for layer, (k, v) in enumerate(kv):
                cache.k[layer, r, :, :start], cache.v[layer, r, :, :start] = k[0], v[0]
        out = []
        for step in range(steps):
            positions = torch.tensor([[s + step] for s in starts])
            tokens = prompts[torch.arange(len(rows)), positions[:, 0]][:, None]
            batch = AdapterBatch([AdapterSegment(0, len(rows), None)],
                                 grouped=GroupedLora.build(stacks, group, model.device, kernels))
            out.append(model.logits(model.hidden_states(tokens, batch, positions=positions, cache=cache), batch, decoding=True)[:, 0])
    return out


@pytest.fixture(params=tiny_models.FAMILIES)
def setup(request):
    model = tiny_model(request.param)
    first, second = adapter(model, 1, 4), adapter(model, 2, 8)
    rows = [first, None, second, first]
    prompts = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    return model, rows, prompts, [5, 3, 8, 5]  # rows at different positions: masked attention


@pytest.mark.parametrize("packed", [False, True])
def test_a_decode_step_through_the_c_kernels_equals_the_torch_step(setup, c_kernels, packed):
    model, rows, prompts, starts = setup
    if packed:
        assert model.pack_for_cpu()
    fused = decode_run(model, c_kernels, rows, prompts, starts, steps=3)
    plain = decode_run(model, None, rows, prompts, starts, steps=3)
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_steps_continue_the_causal_pass(setup):
    """Each row's decode steps (its own adapter, its own position) give the logits a causal pass
    over the whole prompt gives at those positions."""
    model, rows, prompts, starts = setup
    steps = decode_run(model, None, rows, prompts, starts, steps=3)
    with torch.no_grad():
        for r, adapter_r in enumerate(rows):
            full = model.logits(model.hidden_states(prompts[r : r + 1], AdapterBatch.single(adapter_r, 1)), AdapterBatch.single(adapter_r, 1))[0]
            for step, logits in enumerate(steps):
                torch.testing.assert_close(logits[r], full[starts[r] + step], rtol=1e-4, atol=1e-4)
