"""tinker-cookbook's math_rl recipe, unmodified, on a Qwen3 model served under its hub name.

A tiny random Qwen3 (tests/tiny_models.py) is served as `--model Qwen/Qwen3-0.6B=DIR`, so
the recipe sees a real Qwen3 name, loads the tokenizer by that name from the HF cache the
server seeds (the shim's SmolLM2 entries do not apply), and renders with the cookbook's own
`qwen3` renderer. One RL step, judged as test_cookbook_recipes.py judges its RL runs (docs/cookbook.md §2.5).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from harness import Cookbook, non_finite

import tiny_models
from tinkerd_testing import Server

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(3600)]

MATH_RL = "tinker_cookbook.recipes.math_rl.train"
QWEN3 = "Qwen/Qwen3-0.6B"
RL_ARGS = {
    "model_name": QWEN3,
    "renderer_name": "qwen3",
    "env": "arithmetic",
    "group_size": 2,
    "groups_per_batch": 2,
    "max_tokens": 8,
    "lora_rank": 4,
    "learning_rate": 1e-4,
    "max_steps": 1,
    "save_every": 1,
    "eval_every": 0,
}


@pytest.fixture(scope="module")
def qwen3_cookbook(cookbook_python: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cookbook-qwen3")
    # The default model's tokenizer, so the recipe's arithmetic prompts tokenize as they would for SmolLM2.
    tiny = tiny_models.save_model("qwen3", root / "tiny-qwen3", model_dir)
    server = Server(tiny, root / "tinkerd-data", model_name=QWEN3).start()
    runs = root / "runs"
    runs.mkdir()
    yield Cookbook(cookbook_python, server, runs, tiny)
    server.stop()


def test_math_rl_one_step_on_qwen3_with_its_own_renderer(qwen3_cookbook: Cookbook):
    run = qwen3_cookbook.run("math_rl_qwen3", MATH_RL, RL_ARGS)
    run.assert_ok()
    rows = [row for row in run.metrics if "optim/kl_sample_train_v1" in row]
    assert len(rows) == RL_ARGS["max_steps"], run.describe()
    assert not non_finite(run.metrics), non_finite(run.metrics)
    assert all(math.isfinite(row.get("grad_norm:mean", math.nan)) for row in rows), [r.get("grad_norm:mean") for r in rows]
    for row in rows:
        v1, v2 = row["optim/kl_sample_train_v1"], row["optim/kl_sample_train_v2"]
        # Sampler and trainer log-probs of the same tokens under the same weights agree.
        assert abs(v1) < 1e-2 and 0 <= v2 < 1e-3, f"step {row['step']}: kl_sample_train v1={v1} v2={v2}"
    assert any(c.get("sampler_path", "").startswith("tinker://") for c in run.checkpoints), run.checkpoints
