"""Adapters that other tools load as they are: PEFT downloads, merged exports, PEFT imports.

The reference is always tinkerd's own sampler: `compute_logprobs` on the same checkpoint
must match what peft / transformers compute from the exported files, within 1e-4 (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tinker
import torch
from tinker import types

from reference_logprobs import hf_logprobs, load_hf, tinkerd_logprobs

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Q: What is the capital of France?\nA: Paris.", "The quick brown fox jumps over the lazy dog because"]
ALL_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def tinkerd_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "tinkerd.cli", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory, tokenizer):
    """A private server and one run trained hard enough that the adapter visibly matters."""
    from tinkerd_testing import Server

    srv = Server(model_dir, tmp_path_factory.mktemp("export") / "data").start()
    try:
        sc = tinker.ServiceClient(base_url=srv.base_url)
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=5)
        data = [sft_datum(tokenizer, t) for t in PROMPTS]
        for _ in range(3):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        sampler_path = tc.save_weights_for_sampler("final").result().path
        external_path = tc.save_weights_external("final").result().path
        sampler = sc.create_sampling_client(model_path=sampler_path).result()
        yield {"srv": srv, "sc": sc, "tc": tc, "sampler_path": sampler_path, "external_path": external_path,
               "sampler": sampler, "ids": [tokenizer.encode(p) for p in PROMPTS]}
    finally:
        srv.stop()


def test_downloaded_adapter_loads_in_peft_with_the_same_logprobs(trained, model_dir, tmp_path):
    import warnings

    from peft import PeftModel

    rc = tinker.RestClient(base_url=trained["srv"].base_url)
    urls = rc.get_external_weights_urls(trained["external_path"]).result().urls
    for name, url in urls.items():
        (tmp_path / name).write_bytes(urllib.request.urlopen(url, timeout=60).read())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == ALL_TARGETS

    base = load_hf(model_dir)
    base_lps = [hf_logprobs(base, ids) for ids in trained["ids"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert not [w for w in caught if "Unexpected keyword arguments" in str(w.message)]
    for ids, base_lp in zip(trained["ids"], base_lps, strict=True):
        want = tinkerd_logprobs(trained["sampler"], ids)
        got = hf_logprobs(peft_model, ids)
        assert (got - want).abs().max().item() < 1e-4
        assert (got - base_lp).abs().max().item() > 1e-2  # the adapter really changes the model


def test_export_merged_is_a_plain_transformers_model(trained, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    proc = tinkerd_cli("export", "merged", trained["sampler_path"], str(out),
                       "--data-dir", str(trained["srv"].data_dir), "--model", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not merged.config.tie_word_embeddings  # lm_head carries its own merged LoRA
    base = load_hf(model_dir)
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    for ids in trained["ids"]:
        want = tinkerd_logprobs(trained["sampler"], ids)
        # Merging W + BA in fp32 rounds each weight: agreement to fp32 precision (relative
        # 2e-5 of a logprob, 1e-4 absolute), not the bit-for-bit agreement of the PEFT model.
        torch.testing.assert_close(hf_logprobs(merged, ids), want, rtol=2e-5, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode(PROMPTS[0]) == trained["ids"][0]

    again = tinkerd_cli("export", "merged", trained["sampler_path"], str(out),
                        "--data-dir", str(trained["srv"].data_dir), "--model", str(model_dir))
    assert again.returncode == 1 and "--force" in again.stderr  # never clobbers silently
    missing = tinkerd_cli("export", "merged", trained["sampler_path"] + "-nope", str(tmp_path / "x"),
                          "--data-dir", str(trained["srv"].data_dir), "--model", str(model_dir))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def make_peft_adapter(model_dir: Path, out: Path):
    """A PEFT LoRA made by peft itself: r=4, alpha=8, attention q/v + MLP down, random B."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(str(out))
    return model.eval()


def test_import_adapter_samples_and_trains_further(trained, model_dir, tmp_path, tokenizer):
    peft_model = make_peft_adapter(model_dir, tmp_path / "peft")
    proc = tinkerd_cli("import-adapter", str(tmp_path / "peft"), "--data-dir", str(trained["srv"].data_dir),
                       "--model", str(model_dir), "--name", "from-peft")
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert path.startswith("tinker://") and path.endswith("/weights/from-peft")

    sc = trained["sc"]
    sampler = sc.create_sampling_client(model_path=path).result()
    for ids in trained["ids"]:
        assert (tinkerd_logprobs(sampler, ids) - hf_logprobs(peft_model, ids)).abs().max().item() < 1e-4

    rc = tinker.RestClient(base_url=trained["srv"].base_url)
    run = rc.get_training_run_by_tinker_path(path).result()
    assert run.base_model == BASE and run.lora_rank == 4 and run.last_checkpoint.tinker_path == path

    tc = sc.create_training_client_from_state(path).result()
    assert tc.get_info().lora_rank == 4
    data = [sft_datum(tokenizer, PROMPTS[1])]
    losses = []
    for _ in range(3):
        losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < losses[0]
    trained_further = tc.save_weights_for_sampler("after-import").result().path
    assert sc.create_sampling_client(model_path=trained_further).result().sample(
        types.ModelInput.from_ints(trained["ids"][0]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=3, seed=1)
    ).result().sequences


def test_import_adapter_rejects_an_adapter_for_another_model(trained, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": BASE}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 1024),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1024, 2)},
              str(bad / "adapter_model.safetensors"))
    proc = tinkerd_cli("import-adapter", str(bad), "--data-dir", str(trained["srv"].data_dir), "--model", str(trained["srv"].model_dir))
    assert proc.returncode == 1 and "another model" in proc.stderr
