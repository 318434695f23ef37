"""Llama 3.x, Qwen3 and Qwen3 MoE end to end: tiny random models of each family, served side
by side by one tinkerd, trained through the unmodified tinker SDK, and their checkpoints
loaded by the tools a user takes them to (the `tinker` CLI + PEFT, `tinkerd export merged`
+ transformers, the OpenAI client).

The reference is always tinkerd itself on the same checkpoint: what peft / transformers
compute from the exported files must match its logprobs within 1e-4 (fp32), and its OpenAI
door must say what its SamplingClient says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
import torch
from tinker import types

import tiny_models
from reference_logprobs import hf_logprobs, load_hf, tinkerd_logprobs
from tinkerd_testing import REPO, Server, free_port

FAMILIES = ("llama3", "qwen3", "qwen3_moe")
DENSE = ("llama3", "qwen3")
# Public names (`--model NAME=DIR`) that no real hub repository has: the server seeds the
# test HF cache with each model's tokenizer under its name.
NAMES = {"llama3": "tinkerd-tests/tiny-llama3", "qwen3": "tinkerd-tests/tiny-qwen3", "qwen3_moe": "tinkerd-tests/tiny-qwen3-moe"}
TINKER_CLI = str(Path(sys.executable).with_name("tinker"))
TEXTS = ["Q: What is the capital of France?\nA: Paris.", "The quick brown fox jumps over the lazy dog because"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]
STEPS = 3


def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def serve_and_fail(model_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    """`tinkerd serve` of a model that must be refused; returns the finished process."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--data-dir", str(data_dir), "--model", str(model_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def family_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: tiny_models.save_model(family, root / family, model_dir) for family in FAMILIES}


@pytest.fixture(scope="module")
def family_server(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One server for all three families (one start-up instead of three), each under its name."""
    first, *others = FAMILIES
    extra = [arg for family in others for arg in ("--model", f"{NAMES[family]}={family_dirs[family]}")]
    srv = Server(family_dirs[first], tmp_path_factory.mktemp("families-server") / "data", extra,
                 model_name=NAMES[first]).start()
    yield srv
    srv.stop()


class Runs:
    """One LoRA run per family, trained on first use and shared by the module's tests."""

    def __init__(self, server: Server, dirs: dict[str, Path]):
        self.server = server
        self.dirs = dirs
        self.sc = tinker.ServiceClient(base_url=server.base_url)
        self._runs: dict[str, dict] = {}

    def __getitem__(self, family: str) -> dict:
        if family not in self._runs:
            self._runs[family] = self._train(family)
        return self._runs[family]

    def _train(self, family: str) -> dict:
        tc = self.sc.create_lora_training_client(base_model=NAMES[family], rank=4, seed=3)
        tokenizer = tc.get_tokenizer()  # by the model's name, from the HF cache the server seeded
        data = [sft_datum(tokenizer, t) for t in TEXTS]
        losses = []
        for _ in range(STEPS):
            losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(tc.forward(data, "cross_entropy").result().metrics["loss:sum"])
        # The same weights twice: a sampler checkpoint (tinkerd's reference, the OpenAI model
        # name) and an external one, since the `tinker` CLI downloads only weights/ and
        # external_weights/ checkpoints.
        sampler_path = tc.save_weights_for_sampler("final").result().path
        external_path = tc.save_weights_external("final").result().path if family in DENSE else None
        return {"tc": tc, "tokenizer": tokenizer, "ids": [tokenizer.encode(t) for t in TEXTS], "losses": losses,
                "sampler_path": sampler_path, "external_path": external_path,
                "sampler": self.sc.create_sampling_client(model_path=sampler_path)}


@pytest.fixture(scope="module")
def runs(family_server: Server, family_dirs: dict[str, Path]) -> Runs:
    return Runs(family_server, family_dirs)


def test_the_server_lists_every_family(runs: Runs):
    caps = runs.sc.get_server_capabilities()
    assert {m.model_name for m in caps.supported_models} == set(NAMES.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_lowers_the_loss(runs: Runs, family: str):
    losses = runs[family]["losses"]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", DENSE)
def test_downloaded_adapter_loads_in_peft_with_the_same_logprobs(runs: Runs, family: str, tmp_path: Path):
    from peft import PeftModel

    run = runs[family]
    env = {**os.environ, "TINKER_BASE_URL": runs.server.base_url, "TINKER_API_KEY": "tml-test"}
    proc = subprocess.run([TINKER_CLI, "checkpoint", "download", run["external_path"], "-o", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    adapter = tmp_path / run["external_path"].replace("tinker://", "").replace("/", "_")

    base = load_hf(runs.dirs[family])
    base_lps = [hf_logprobs(base, ids) for ids in run["ids"]]
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    for ids, base_lp in zip(run["ids"], base_lps, strict=True):
        want = tinkerd_logprobs(run["sampler"], ids)
        got = hf_logprobs(peft_model, ids)
        assert (got - want).abs().max().item() < 1e-4
        assert (got - base_lp).abs().max().item() > 1e-2  # the adapter really changes the model


@pytest.mark.parametrize("family", FAMILIES)
def test_export_merged_loads_in_plain_transformers_with_the_same_logprobs(runs: Runs, family: str, tmp_path: Path):
    run = runs[family]
    out = tmp_path / "merged"
    # No --model: the checkpoint names its base model, which the data dir knows was served
    # from that family's directory (the HF cache's entry of the name holds only a tokenizer).
    proc = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "export", "merged", run["sampler_path"], str(out),
         "--data-dir", str(runs.server.data_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    merged = load_hf(out)
    base = load_hf(runs.dirs[family])
    for ids in run["ids"]:
        want = tinkerd_logprobs(run["sampler"], ids)
        got = hf_logprobs(merged, ids)
        # Merging W + BA in fp32 rounds each weight: agreement to fp32 precision, not bit for bit.
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-4)
        assert (got - hf_logprobs(base, ids)).abs().max().item() > 1e-2  # the merge did change the weights


def _token_ids(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_greedy_equals_the_sampling_client(runs: Runs, family: str):
    from openai import OpenAI

    run = runs[family]
    tokenizer = run["tokenizer"]
    oai = OpenAI(base_url=runs.server.base_url + "/v1", api_key="tml-test", max_retries=0, timeout=120)
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    eos = {tokenizer.eos_token_id}  # the model dirs' generation_config.json stops there too

    prompt_ids = tokenizer.encode("Once upon a time")
    ref = run["sampler"].sample(types.ModelInput.from_ints(prompt_ids), 1, params).result().sequences[0]
    ref_tokens = [t for t in ref.tokens if t not in eos]
    out = oai.completions.create(model=run["sampler_path"], prompt=prompt_ids, max_tokens=12, temperature=0, logprobs=0,
                                 extra_body={"return_tokens_as_token_ids": True})
    assert _token_ids(out.choices[0].logprobs.tokens) == ref_tokens
    assert out.choices[0].text == tokenizer.decode(ref_tokens)

    # The chat door renders the model directory's chat template, as apply_chat_template does.
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = run["sampler"].sample(types.ModelInput.from_ints(chat_ids), 1, params).result().sequences[0]
    chat = oai.chat.completions.create(model=run["sampler_path"], messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert _token_ids([c.token for c in chat.choices[0].logprobs.content]) == [t for t in ref.tokens if t not in eos]
    assert chat.choices[0].message.content == tokenizer.decode([t for t in ref.tokens if t not in eos],
                                                                skip_special_tokens=True)


# -- configs tinkerd does not implement ---------------------------------------------------------


def _edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def test_an_unimplemented_config_is_refused_at_start_naming_the_field(family_dirs: dict[str, Path], tmp_path: Path):
    def yarn(config: dict) -> None:
        # As a hub config written by transformers 4.x has it: rope_theta beside rope_scaling.
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}

    def gemma(config: dict) -> None:
        config["architectures"] = ["GemmaForCausalLM"]

    proc = serve_and_fail(_edited_copy(family_dirs["llama3"], tmp_path / "yarn", yarn), tmp_path / "data-yarn")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "rope_type" in output and "yarn" in output, output[-3000:]

    proc = serve_and_fail(_edited_copy(family_dirs["qwen3_moe"], tmp_path / "gemma", gemma), tmp_path / "data-gemma")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "architectures" in output and "GemmaForCausalLM" in output, output[-3000:]
