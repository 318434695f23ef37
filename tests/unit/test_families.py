"""Each supported family against transformers' own implementation of it (tests/tiny_models.py):
logits, LoRA gradients (against PEFT for dense models, against the merged-weights form of
the same adapter for MoE), and the refusal of settings tinkerd does not implement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from tinkerd.engine.model import AdapterBatch, AdapterSegment, ModelConfig, UnsupportedModelError, init_lora, lora_module_paths
from tinkerd.engine.model.llama import rotary_inv_freq

VOCAB = 320


def random_adapter(model, seed: int, rank: int = 4, alpha: float = 8.0):
    """An adapter on every module tinkerd can train, with B away from zero (a fresh one's
    zero B would leave A without gradient)."""
    weights = init_lora(model.cfg, lora_module_paths(model.cfg, True, True, True), rank, alpha, seed, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for path in weights.b:
        weights.b[path] = torch.randn(weights.b[path].shape, generator=gen) * 0.1
    return weights


def loss_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_logits_equal_transformers(family):
    hf = tiny_models.build(family, VOCAB)
    ours = tiny_models.tinkerd_model(hf)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (1, 6, 70):  # 70 is past the llama3 config's original context of 64
            tokens = torch.randint(0, VOCAB, (2, length), generator=gen)
            assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4, length


def test_llama3_rotary_frequencies_are_the_scaled_ones_transformers_uses():
    hf = tiny_models.build("llama3", VOCAB)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ours = rotary_inv_freq(cfg)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq.float(), rtol=0, atol=0)
    plain = rotary_inv_freq(ModelConfig.from_hf({**hf.config.to_dict(), "rope_scaling": None, "rope_parameters": None}))
    assert not torch.equal(ours, plain)  # the scaling changed the long wavelengths


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [
    {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},  # as transformers 4 wrote it
    {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}},  # as transformers 5 writes it
    {"rope_theta": 250000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    # both: transformers reads rope_scaling and ignores rope_parameters
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rope_scaling": LLAMA3_SCALING},
    {"rope_theta": 123.0, "rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}, "rope_scaling": {"rope_type": "default"}},
])
def test_rotary_settings_are_read_as_transformers_reads_them(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = {**tiny_models.config("llama2").to_dict(), "rope_scaling": None, "rope_parameters": None, **rope}
    if "rope_theta" not in rope:
        raw.pop("rope_theta", None)
    raw["architectures"] = ["LlamaForCausalLM"]
    theirs = LlamaRotaryEmbedding(LlamaConfig.from_dict(dict(raw))).inv_freq.float()
    torch.testing.assert_close(rotary_inv_freq(ModelConfig.from_hf(raw)), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("family", tiny_models.DENSE_FAMILIES)
def test_lora_gradients_equal_peft(family):
    from peft import LoraConfig, get_peft_model

    hf = tiny_models.build(family, VOCAB)
    ours = tiny_models.tinkerd_model(hf)
    adapter = random_adapter(ours, seed=3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0))
    for path in adapter.a:
        module = peft_model.base_model.model.get_submodule(path)
        module.lora_A["default"].weight.data.copy_(adapter.a[path])
        module.lora_B["default"].weight.data.copy_(adapter.b[path])
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))

    loss_of(peft_model(tokens).logits, tokens).backward()
    for weights in (adapter.a, adapter.b):
        for tensor in weights.values():
            tensor.requires_grad_(True)
    loss_of(ours(tokens, AdapterBatch.single(adapter, 2)), tokens).backward()

    for path in adapter.a:
        module = peft_model.base_model.model.get_submodule(path)
        torch.testing.assert_close(adapter.a[path].grad, module.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapter.b[path].grad, module.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def merged_parameters(hf, adapter) -> dict[str, torch.Tensor]:
    """transformers' parameters with each LoRA update merged in (W + scale · B A), as
    functions of the adapter's A and B: the reference a LoRA's gradient must equal."""
    params = dict(hf.named_parameters())
    deltas = {path: adapter.scale * adapter.b[path] @ adapter.a[path] for path in adapter.a}
    merged = {}
    for path, delta in deltas.items():
        if ".mlp.experts." not in path:
            merged[path + ".weight"] = params[path + ".weight"] + delta
    for layer in range(hf.config.num_hidden_layers):
        stacked = f"model.layers.{layer}.mlp.experts."
        if stacked + "gate_up_proj" not in params:
            continue
        experts = range(params[stacked + "gate_up_proj"].shape[0])
        p = f"model.layers.{layer}.mlp.experts."
        merged[stacked + "gate_up_proj"] = params[stacked + "gate_up_proj"] + torch.stack(
            [torch.cat([deltas[f"{p}{e}.gate_proj"], deltas[f"{p}{e}.up_proj"]]) for e in experts])
        merged[stacked + "down_proj"] = params[stacked + "down_proj"] + torch.stack([deltas[f"{p}{e}.down_proj"] for e in experts])
    return merged


def test_moe_lora_gradients_equal_the_merged_weights_reference():
    """Attention and every expert's projections carry their own A and B; the router is frozen."""
    hf = tiny_models.build("qwen3_moe", VOCAB)
    ours = tiny_models.tinkerd_model(hf)
    adapter = random_adapter(ours, seed=5)
    assert "model.layers.0.mlp.experts.7.down_proj" in adapter.a and "model.layers.0.mlp.gate" not in adapter.a
    assert "model.layers.1.mlp.down_proj" in adapter.a  # mlp_only_layers keeps a dense MLP
    for weights in (adapter.a, adapter.b):
        for tensor in weights.values():
            tensor.requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(6))

    reference = loss_of(torch.func.functional_call(hf, merged_parameters(hf, adapter), (tokens,)).logits, tokens)
    want = torch.autograd.grad(reference, [*adapter.a.values(), *adapter.b.values()], allow_unused=True)
    got_loss = loss_of(ours(tokens, AdapterBatch.single(adapter, 3)), tokens)
    got = torch.autograd.grad(got_loss, [*adapter.a.values(), *adapter.b.values()], allow_unused=True)

    torch.testing.assert_close(got_loss, reference, rtol=1e-6, atol=1e-4)
    used = 0
    for g, w in zip(got, want, strict=True):
        if w is None:  # an expert no token was routed to: no gradient either way
            assert g is None or not g.any()
            continue
        used += 1
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert used > len(got) // 2


def test_moe_rows_of_different_adapters_in_one_pass_get_their_own_updates():
    """Tokens of rows of two adapters (and a base row) meet in the same experts; each row's
    logits and gradients are those of a pass of its adapter alone."""
    ours = tiny_models.tinkerd_model(tiny_models.build("qwen3_moe", VOCAB))
    first, second = random_adapter(ours, seed=7), random_adapter(ours, seed=8)
    for adapter in (first, second):
        for weights in (adapter.a, adapter.b):
            for tensor in weights.values():
                tensor.requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(9))
    batch = AdapterBatch([AdapterSegment(0, 2, first), AdapterSegment(2, 4, second)])  # row 4: the base model
    together = ours(tokens, batch)
    alone = [ours(tokens[:2], AdapterBatch.single(first, 2)), ours(tokens[2:4], AdapterBatch.single(second, 2)),
             ours(tokens[4:])]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)

    path = "model.layers.0.mlp.experts.3.up_proj"
    grad_together = torch.autograd.grad(loss_of(together[:2], tokens[:2]), [first.b[path]])[0]
    grad_alone = torch.autograd.grad(loss_of(alone[0], tokens[:2]), [first.b[path]])[0]
    torch.testing.assert_close(grad_together, grad_alone, rtol=1e-5, atol=1e-6)


def base_config(**changes) -> dict:
    cfg = tiny_models.config("llama2").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes, named", [
    ({"architectures": ["GemmaForCausalLM"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}}, "rope_scaling.rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_settings_tinkerd_does_not_implement_are_refused_naming_the_field(changes, named):
    with pytest.raises(UnsupportedModelError, match=named):
        ModelConfig.from_hf(base_config(**changes))


def test_a_sliding_window_caps_the_served_context_where_it_equals_full_attention():
    mistral_v01 = base_config(architectures=["MistralForCausalLM"], sliding_window=128, max_position_embeddings=512)
    assert ModelConfig.from_hf(mistral_v01).max_context == 128
    qwen_off = base_config(architectures=["Qwen2ForCausalLM"], sliding_window=128, use_sliding_window=False)
    assert ModelConfig.from_hf(qwen_off).max_context == 512
    qwen_on = base_config(architectures=["Qwen2ForCausalLM"], sliding_window=128, use_sliding_window=True)
    assert ModelConfig.from_hf(qwen_on).max_context == 128


def test_a_bfloat16_model_holds_no_float32_copy_of_its_weights(tmp_path):
    """The engine's dtype is bfloat16 on CUDA: every weight of the loaded tree (experts,
    router and q/k norms included) is held in it, nothing in float32 beside it."""
    from tinkerd.engine.model import LlamaModel

    tiny_models.build("qwen3_moe", VOCAB).save_pretrained(str(tmp_path))
    model = LlamaModel.load(tmp_path, torch.device("cpu"), torch.bfloat16)
    tensors = [value for module in model.modules() for value in vars(module).values() if isinstance(value, torch.Tensor)]
    assert len(tensors) > 20 and {t.dtype for t in tensors} == {torch.bfloat16}
