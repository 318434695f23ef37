"""tinker-cookbook 0.6.1 recipes, unmodified, against a real tinkerd (the acceptance tier).

Each test runs one recipe as a subprocess in the cookbook's own venv and judges it by what
the recipe itself writes: its exit code, `metrics.jsonl` and `checkpoints.jsonl`.
docs/cookbook.md §2 describes each scenario. Seconds per step go to
bench/results/cookbook_acceptance.json.
"""

from __future__ import annotations

import json
import math

import pytest
from harness import non_finite

# A recipe has its own timeout (harness.RECIPE_TIMEOUT_S); the first test also builds the venv.
pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(3600)]

CHAT_SL = "tinker_cookbook.recipes.chat_sl.train"
MATH_RL = "tinker_cookbook.recipes.math_rl.train"

SL_STEPS = 3
SL_SAVE_EVERY = 2
SL_RESUMED_STEPS = 4  # the resumed run goes one step further than the original
SL_ARGS = {
    "renderer_name": "qwen3_instruct",
    "batch_size": 8,
    "max_length": 512,
    "lora_rank": 8,
    "learning_rate": 1e-4,
    # Constant, so the learning rate of a step does not depend on when the run was started.
    "lr_schedule": "constant",
    "max_steps": SL_STEPS,
    "save_every": SL_SAVE_EVERY,
    "eval_every": 0,
}

RL_STEPS = 2
RL_ARGS = {
    "env": "arithmetic",
    "renderer_name": "qwen3_instruct",
    "group_size": 4,
    "groups_per_batch": 4,
    "max_tokens": 8,
    "lora_rank": 8,
    "learning_rate": 1e-4,
    "max_steps": RL_STEPS,
    "save_every": 1,
    "eval_every": 0,
}


def conversations_file(cookbook) -> str:
    out = cookbook.run_python(
        "import importlib.resources as r; print(r.files('tinker_cookbook') / 'example_data' / 'conversations.jsonl')"
    )
    return out.strip()


@pytest.fixture(scope="module")
def sl_run(cookbook):
    """chat_sl on the cookbook's shipped conversations, checkpointing every SL_SAVE_EVERY steps."""
    run = cookbook.run("chat_sl", CHAT_SL, {"dataset": conversations_file(cookbook), **SL_ARGS})
    # Kept before the resume test rewrites these files.
    run.extra["metrics"] = run.metrics
    run.extra["checkpoints"] = run.checkpoints
    return run


def nll_by_step(rows: list[dict]) -> dict[int, float]:
    return {row["step"]: row["train_mean_nll"] for row in rows if "train_mean_nll" in row}


def test_chat_sl_trains_and_records_checkpoints(sl_run):
    sl_run.assert_ok()
    nll = nll_by_step(sl_run.extra["metrics"])
    assert sorted(nll) == list(range(SL_STEPS)), sl_run.describe()
    assert all(math.isfinite(v) for v in nll.values()), nll
    assert nll[SL_STEPS - 1] < nll[0], f"train_mean_nll did not fall: {nll}"

    checkpoints = sl_run.extra["checkpoints"]
    periodic = [c for c in checkpoints if c.get("name") != "final"]
    assert periodic, f"no periodic checkpoint recorded: {checkpoints}"
    assert checkpoints[-1].get("name") == "final", checkpoints
    for record in checkpoints:
        assert record["state_path"].startswith("tinker://") and "/weights/" in record["state_path"], record
        if "sampler_path" in record:
            assert record["sampler_path"].startswith("tinker://"), record
    assert any("sampler_path" in c for c in checkpoints), checkpoints


def optimizer_steps(server, tinker_path: str) -> int:
    """Adam's step count stored in a tinkerd `save_state` checkpoint (white-box: reads its files).

    tinker://<run_id>/weights/<name> lives in <data>/checkpoints/<run_id>/weights/<name>@<version>/.
    """
    from safetensors import safe_open

    run_id, kind, name = tinker_path.removeprefix("tinker://").split("/")
    found = sorted((server.data_dir / "checkpoints" / run_id / kind).glob(f"{name}@*/optimizer.safetensors"))
    assert len(found) == 1, f"{tinker_path}: expected one stored version, found {found}"
    with safe_open(str(found[0]), framework="pt") as handle:
        steps = {float(v) for v in json.loads(handle.metadata()["steps"]).values()}
    assert len(steps) == 1, steps
    return int(steps.pop())


def test_chat_sl_resumes_from_its_last_periodic_checkpoint(cookbook, sl_run):
    """Drop the `final` record so the run counts as interrupted, then resume it for real.

    The cookbook submits step k+1 before it finishes step k and saves checkpoint k in
    between, so (the server keeping a training client's requests in order) checkpoint k
    already holds step k+1's update too: the resumed run re-trains those batches on
    weights that have seen them. Hence the checks: the resumed loss at the checkpoint's
    batch is no higher than the original's (a fresh adapter would be far higher), and
    Adam's step count continues from the checkpoint's instead of restarting at 0.
    """
    sl_run.assert_ok()
    checkpoints = sl_run.extra["checkpoints"]
    resumable = [c for c in checkpoints if c.get("name") != "final"]
    last = resumable[-1]
    (sl_run.log_path / "checkpoints.jsonl").write_text("".join(json.dumps(c) + "\n" for c in resumable))

    resumed = cookbook.run(
        "chat_sl_resume", CHAT_SL,
        {
            "dataset": conversations_file(cookbook), **SL_ARGS, "max_steps": SL_RESUMED_STEPS,
            "log_path": sl_run.log_path, "behavior_if_log_dir_exists": "resume",
        },
        first_step=last["batch"],
    )
    resumed.assert_ok()
    assert f"Resumed training from {last['state_path']}" in resumed.output(), resumed.describe()

    before = nll_by_step(sl_run.extra["metrics"])
    after = nll_by_step(resumed.metrics)
    start = last["batch"]
    resumed_steps = list(range(start, SL_RESUMED_STEPS))
    assert sorted(after) == list(range(SL_RESUMED_STEPS)), f"metrics steps after resume: {sorted(after)}"
    assert all(math.isfinite(after[step]) for step in resumed_steps), after
    assert after[start] <= before[start] + 1e-4, (
        f"step {start}: resumed nll {after[start]} > original {before[start]}: weights not restored?"
    )

    final = resumed.checkpoints[-1]
    assert final.get("name") == "final" and final["state_path"] != last["state_path"], resumed.checkpoints
    loaded = optimizer_steps(cookbook.server, last["state_path"])
    assert optimizer_steps(cookbook.server, final["state_path"]) == loaded + len(resumed_steps), (
        f"Adam step count did not continue from the checkpoint's {loaded}: optimizer state not restored"
    )


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"])
def test_math_rl_arithmetic(cookbook, loss_fn):
    run = cookbook.run(f"math_rl_{loss_fn}", MATH_RL, {**RL_ARGS, "loss_fn": loss_fn})
    run.assert_ok()
    rows = [row for row in run.metrics if "optim/kl_sample_train_v1" in row]
    assert len(rows) == RL_STEPS, run.describe()
    assert not non_finite(run.metrics), non_finite(run.metrics)
    # The recipe does not log the loss itself; a non-finite loss would show up here as a
    # non-finite gradient norm (tinkerd's optim_step metric) or non-finite train log-probs.
    assert all(math.isfinite(row.get("grad_norm:mean", math.nan)) for row in rows), [r.get("grad_norm:mean") for r in rows]
    for row in rows:
        v1, v2 = row["optim/kl_sample_train_v1"], row["optim/kl_sample_train_v2"]
        # Sampler and trainer log-probs of the same tokens under the same weights agree.
        assert abs(v1) < 1e-2 and 0 <= v2 < 1e-3, f"step {row['step']}: kl_sample_train v1={v1} v2={v2}"
    assert any(c.get("sampler_path", "").startswith("tinker://") for c in run.checkpoints), run.checkpoints


def test_math_rl_off_policy_samples_from_older_checkpoints(cookbook):
    """Async RL: rollouts keep sampling from a checkpoint up to 2 steps older than the trainer."""
    steps = 4
    run = cookbook.run(
        "math_rl_off_policy", MATH_RL, {**RL_ARGS, "max_steps_off_policy": 2, "max_steps": steps, "save_every": 2}
    )
    run.assert_ok()
    rows = [row for row in run.metrics if "optim/kl_sample_train_v1" in row]
    assert len(rows) == steps, run.describe()
    assert not non_finite(run.metrics), non_finite(run.metrics)
    staleness = [row.get("async/staleness_max", 0) for row in rows]
    assert max(staleness) >= 1, f"no step trained on samples from an older checkpoint: {staleness}"
    assert all(s <= 2 for s in staleness), staleness
