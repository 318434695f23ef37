"""Unit tests for tinkerd.engine.losses against the reference numbers of docs/losses.md.

Expected numbers are copied from docs/losses.md §6 (computed there in float64 from the
formulas, independently of this module, and rounded to 6 dp); the module computes in fp32,
so values are compared with an absolute tolerance a little above that rounding.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

try:
    from tinkerd.engine import losses
except ModuleNotFoundError:  # not installed yet: import straight from the src layout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from tinkerd.engine import losses

TOL = 2e-6
METRIC_KEY = re.compile(r"^[^:]+:(sum|mean|min|max)$")

# §6.2 shared RL datum; position 0 is a padded prompt position.
RL_LP = [-0.5, -1.0, -0.7, -2.0, -0.2]
RL_Q = [0.0, -1.2, -0.5, -1.5, -0.6]
RL_ADV = [0.0, 1.0, 1.0, -1.0, -0.5]
RL_SEQ_MASK = [0.0, 1.0, 1.0, 1.0, 1.0]
IS_GRAD = [0.0, -1.221403, -0.818731, 0.606531, 0.745912]
PPO_GRAD = [0.0, 0.0, -0.818731, 0.0, 0.745912]
SR_GRAD = [0.0, -0.997786, -1.001813, 0.996065, 0.504918]  # PROPOSAL objective


def f32(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def rl_inputs(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs = {
        "target_tokens": torch.arange(5, dtype=torch.int64),
        "logprobs": f32(RL_Q),
        "advantages": f32(RL_ADV),
        "sequence_ratio_mask": f32(RL_SEQ_MASK),
    }
    inputs.update(overrides)
    return inputs


def run_loss(
    loss_fn: str,
    lp_values: list[float] | list[list[float]],
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str] | None = None,
    stability: losses.StabilityInfo | None = None,
) -> tuple[losses.LossResult, torch.Tensor]:
    """Validate and compute as the engine does; return the result and d loss/d lp."""
    resolved = losses.validate_loss_request(loss_fn, config)
    n_tokens = len(lp_values)
    losses.validate_datum_inputs(loss_fn, inputs, n_tokens, resolved)
    lp = f32(lp_values).requires_grad_(True)
    result = losses.compute_datum_loss(loss_fn, lp, inputs, resolved, stability)
    result.loss.backward()
    assert lp.grad is not None
    return result, lp.grad


def assert_close(actual: torch.Tensor | float, expected: object) -> None:
    actual_t = torch.as_tensor(actual, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual_t, expected_t, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------
# §6.1 cross_entropy
# ------------------------------------------------------------------------------

CE_LOGITS = [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]
CE_TARGETS = [0, 2, 1]
CE_WEIGHTS = [0.0, 1.0, 1.0]
CE_LP = [-0.407606, -1.098612, -0.169846]


def learner_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """§1.3: full-vocabulary log-softmax at T = 1, gathered at the targets."""
    log_probs = torch.log_softmax(logits, dim=-1)
    if targets.dim() == 1:
        return log_probs.gather(-1, targets[:, None])[:, 0]
    return log_probs.gather(-1, targets)


def test_cross_entropy_from_logits_value_and_gradient() -> None:
    logits = f32(CE_LOGITS).requires_grad_(True)
    targets = torch.tensor(CE_TARGETS)
    inputs = {"target_tokens": targets, "weights": f32(CE_WEIGHTS)}
    config = losses.validate_loss_request("cross_entropy", None)
    losses.validate_datum_inputs("cross_entropy", inputs, 3)
    lp = learner_logprobs(logits, targets)
    result = losses.compute_datum_loss("cross_entropy", lp, inputs, config)
    result.loss.backward()

    assert_close(lp.detach(), CE_LP)  # the "logprobs" output, weight-0 row included
    assert_close(result.metrics["loss:sum"], 1.268458)
    assert_close(result.loss.detach(), 1.268458)
    assert logits.grad is not None
    assert_close(
        logits.grad,
        [
            [0.0, 0.0, 0.0],
            [0.333333, 0.333333, -0.666667],
            [0.114195, -0.156205, 0.042010],
        ],
    )
    assert set(result.metrics) == {"loss:sum"}


def test_cross_entropy_top_k_soft_targets() -> None:
    logits = f32([[1.0, 2.0, 3.0], [0.5, 0.5, 2.0]]).requires_grad_(True)
    targets = torch.tensor([[2, 1], [2, 0]])
    weights = f32([[0.75, 0.25], [1.0, 0.0]])
    inputs = {"target_tokens": targets, "weights": weights}
    losses.validate_datum_inputs("cross_entropy", inputs, 2)
    lp = learner_logprobs(logits, targets)
    lp.retain_grad()
    result = losses.compute_datum_loss("cross_entropy", lp, inputs, {})
    result.loss.backward()

    assert_close(lp.detach(), [[-0.407606, -1.407606], [-0.368981, -1.868981]])
    assert_close(result.metrics["loss:sum"], 1.026587)
    assert lp.grad is not None
    assert_close(lp.grad, -weights)  # d loss / d lp = -w, element-wise over (N, K)


def test_cross_entropy_custom_path_a_surrogate() -> None:
    """§6.4: the client sends weights = -dC/dlp for C = sum lp^2; same param grad."""
    targets = torch.tensor(CE_TARGETS)
    weights = -2.0 * f32(CE_LP)  # what the client computes from the forward pass
    assert_close(weights, [0.815212, 2.197225, 0.339692])
    inputs = {"target_tokens": targets, "weights": weights}

    logits = f32(CE_LOGITS).requires_grad_(True)
    result = losses.compute_datum_loss(
        "cross_entropy", learner_logprobs(logits, targets), inputs, {}
    )
    result.loss.backward()
    assert_close(result.metrics["loss:sum"], 2.803879)

    reference_logits = f32(CE_LOGITS).requires_grad_(True)
    custom_loss = learner_logprobs(reference_logits, targets).square().sum()
    assert_close(custom_loss.detach(), 1.401939)
    custom_loss.backward()
    assert logits.grad is not None and reference_logits.grad is not None
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=1e-5, rtol=0)


def test_cross_entropy_negative_weights_are_used_as_given() -> None:
    inputs = {"target_tokens": torch.tensor([0, 1]), "weights": f32([-1.0, 2.5])}
    result, grad = run_loss("cross_entropy", [-0.5, -2.0], inputs)
    assert_close(result.metrics["loss:sum"], -0.5 + 5.0)
    assert_close(grad, [1.0, -2.5])


# ------------------------------------------------------------------------------
# §6.2 RL losses on the shared datum
# ------------------------------------------------------------------------------

RL_CASES = [
    ("importance_sampling", None, -0.687691, IS_GRAD),
    ("ppo", None, -0.472818, PPO_GRAD),
    (
        "ppo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
        -0.272818,
        PPO_GRAD,
    ),
    ("cispo", None, 0.432270, IS_GRAD),
    (
        "cispo",
        {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
        0.432270,
        IS_GRAD,
    ),
    ("dro", None, -0.363000, [-0.05, -0.98, -1.02, 0.95, 0.54]),
    ("dro", {"beta": 0.05}, -0.381500, [-0.025, -0.99, -1.01, 0.975, 0.52]),
    ("gspo", None, -0.487655, [0.0, -0.975310, -0.975310, 0.975310, 0.487655]),
    ("stable_reinforce", None, -0.397615, SR_GRAD),
    ("stable_reinforce", {"kl_coeff": 0.01}, -0.397615, SR_GRAD),
]


@pytest.mark.parametrize(("loss_fn", "config", "loss_sum", "grad"), RL_CASES)
def test_rl_loss_matches_spec_fixture(
    loss_fn: str,
    config: dict[str, float] | None,
    loss_sum: float,
    grad: list[float],
) -> None:
    result, lp_grad = run_loss(loss_fn, RL_LP, rl_inputs(), config)
    assert_close(result.metrics["loss:sum"], loss_sum)
    assert_close(result.loss.detach(), loss_sum)
    assert_close(lp_grad, grad)


def test_ppo_clip_fraction_counts_tokens_without_gradient() -> None:
    result, _ = run_loss("ppo", RL_LP, rl_inputs())
    # Of the 4 tokens with A != 0, positions 1 (A>0, r>1.2) and 3 (A<0, r<0.8) are
    # clipped.
    assert result.metrics["clip_frac:mean"] == pytest.approx(0.5)


def test_cispo_and_gspo_metrics() -> None:
    cispo, _ = run_loss("cispo", RL_LP, rl_inputs())
    assert cispo.metrics["clip_frac:mean"] == 0.0  # every r is inside (0, 4)
    gspo, _ = run_loss("gspo", RL_LP, rl_inputs())
    assert_close(gspo.metrics["seq_ratio:mean"], 0.975310)
    assert gspo.metrics["clip_frac:mean"] == 0.0
    assert_close(gspo.extra_outputs["ratio"], [0.975310] * 5)


def test_ratio_output_is_detached_exp_log_ratio() -> None:
    result, _ = run_loss("importance_sampling", RL_LP, rl_inputs())
    ratio = result.extra_outputs["ratio"]
    assert not ratio.requires_grad
    assert_close(ratio, [0.606531, 1.221403, 0.818731, 0.606531, 1.491825])


def test_importance_sampling_ignores_prompt_padding_and_unknown_keys() -> None:
    # A = 0 at position 0, so its padded q cannot matter; "weights" and "mask" are
    # unknown to this loss and must be ignored (§1.7).
    padded = rl_inputs(
        logprobs=f32([-30.0, *RL_Q[1:]]),
        weights=f32([0.0, 1.0, 1.0, 1.0, 1.0]),
        mask=f32([0.0, 1.0, 1.0, 1.0, 1.0]),
    )
    result, grad = run_loss("importance_sampling", RL_LP, padded)
    assert_close(result.metrics["loss:sum"], -0.687691)
    assert_close(grad, IS_GRAD)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_ppo_per_token_clip_thresholds_override_config(shape: tuple[int, ...]) -> None:
    inputs = rl_inputs(
        clip_low_threshold=torch.full(shape, 0.9),
        clip_high_threshold=torch.full(shape, 1.1),
    )
    result, grad = run_loss("ppo", RL_LP, inputs)
    assert_close(result.metrics["loss:sum"], -0.272818)
    assert_close(grad, PPO_GRAD)


def test_gspo_empty_mask_means_ratio_one() -> None:
    inputs = rl_inputs(sequence_ratio_mask=torch.zeros(5))
    result, grad = run_loss("gspo", RL_LP, inputs)
    assert_close(result.metrics["seq_ratio:mean"], 1.0)
    assert_close(result.metrics["loss:sum"], -sum(RL_ADV))
    assert_close(grad, [-a for a in RL_ADV])


def test_gspo_without_mask_takes_the_ratio_over_sampled_positions() -> None:
    # tinker-cookbook's RL loop sends no sequence_ratio_mask; its prompt positions carry
    # q = 0 and A = 0, exactly where RL_SEQ_MASK is 0, so the result must not change.
    with_mask, grad_with = run_loss("gspo", RL_LP, rl_inputs())
    without_mask, grad_without = run_loss("gspo", RL_LP, without(rl_inputs(), "sequence_ratio_mask"))
    assert_close(without_mask.metrics["seq_ratio:mean"], with_mask.metrics["seq_ratio:mean"])
    assert_close(without_mask.loss, with_mask.loss)
    assert_close(grad_without, grad_with)


def test_gspo_ratio_is_per_datum() -> None:
    # Masking out position 1 changes the mean over M: s = exp((-0.2 - 0.5 + 0.4) / 3).
    inputs = rl_inputs(sequence_ratio_mask=f32([0.0, 0.0, 1.0, 1.0, 1.0]))
    result, _ = run_loss("gspo", RL_LP, inputs)
    assert_close(result.metrics["seq_ratio:mean"], math.exp(-0.1))


# ------------------------------------------------------------------------------
# StableReinforce (PROPOSAL objective) and its stability info
# ------------------------------------------------------------------------------

SAMPLED = torch.tensor([False, True, True, True, True])


def test_stable_reinforce_with_recorded_stability_info() -> None:
    stability = losses.StabilityInfo(sampler_logprobs=f32(RL_Q), sampled_mask=SAMPLED)
    result, grad = run_loss("stable_reinforce", RL_LP, rl_inputs(), stability=stability)
    assert_close(result.metrics["loss:sum"], -0.397615)
    assert_close(grad, SR_GRAD)
    k3 = [math.exp(d) - 1 - d for d in (0.2, -0.2, -0.5, 0.4)]
    assert_close(result.metrics["sampler_kl:mean"], sum(k3) / 4)
    assert result.metrics["sampler_logprob_mismatch:max"] == 0.0
    assert_close(result.extra_outputs["ratio"][0], 1.0)  # off S


def test_stable_reinforce_recorded_logprobs_win_over_client() -> None:
    # The server's record is authoritative (§7.3); garbage off S must not leak NaN.
    recorded = f32([float("nan"), *RL_Q[1:]])
    stability = losses.StabilityInfo(sampler_logprobs=recorded, sampled_mask=SAMPLED)
    client = rl_inputs(logprobs=torch.zeros(5))
    result, grad = run_loss("stable_reinforce", RL_LP, client, stability=stability)
    assert_close(result.metrics["loss:sum"], -0.397615)
    assert_close(grad, SR_GRAD)
    assert_close(result.metrics["sampler_logprob_mismatch:max"], 1.5)


def test_stable_reinforce_fallback_mask_matches_provenance_fixture() -> None:
    """§6.3 datum: without stability info, S is inferred from the client's padding."""
    client_logprobs = f32([0.0, 0.0, -0.3, -0.9])
    advantages = f32([0.0, 0.0, 0.5, 0.5])
    mask = losses.fallback_sampled_mask(client_logprobs, advantages)
    assert mask.tolist() == [False, False, True, True]

    inputs = {
        "target_tokens": torch.tensor([12, 13, 21, 22]),
        "logprobs": client_logprobs,
        "advantages": advantages,
    }
    lp = [-1.0, -2.0, -0.4, -0.7]
    fallback, fallback_grad = run_loss("stable_reinforce", lp, inputs)
    recorded = losses.StabilityInfo(
        client_logprobs, torch.tensor([False, False, True, True])
    )
    provenance, provenance_grad = run_loss(
        "stable_reinforce", lp, inputs, stability=recorded
    )
    assert fallback.metrics == pytest.approx(provenance.metrics)
    assert_close(fallback_grad, provenance_grad)
    assert fallback_grad[:2].tolist() == [0.0, 0.0]  # prompt positions untouched


@pytest.mark.parametrize(
    ("advantages", "sampled", "message"),
    [
        # §6.3: a nonzero advantage on a non-sampled target.
        ([0.0, 0.7, 0.5, 0.5], [False, False, True, True], r"advantages\[1\]"),
        # §6.3: provenance that covers no sampled target.
        ([0.0, 0.0, 0.0, 0.0], [False, False, False, False], "no sampled target"),
    ],
)
def test_stable_reinforce_provenance_rejections(
    advantages: list[float], sampled: list[bool], message: str
) -> None:
    stability = losses.StabilityInfo(f32([0.0, 0.0, -0.3, -0.9]), torch.tensor(sampled))
    with pytest.raises(losses.LossInputError, match=message):
        losses.validate_stability_info(f32(advantages), stability)
    inputs = {
        "target_tokens": torch.tensor([12, 13, 21, 22]),
        "logprobs": f32([0.0, 0.0, -0.3, -0.9]),
        "advantages": f32(advantages),
    }
    lp = torch.zeros(4, requires_grad=True)
    with pytest.raises(losses.LossInputError, match=message):
        losses.compute_datum_loss("stable_reinforce", lp, inputs, {}, stability)


def test_stable_reinforce_stability_shape_mismatch_is_an_engine_error() -> None:
    stability = losses.StabilityInfo(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sampler_logprobs") as info:
        losses.validate_stability_info(f32(RL_ADV), stability)
    assert not isinstance(info.value, losses.LossInputError)


def test_stable_reinforce_truncated_is_variant() -> None:
    lp = f32(RL_LP).requires_grad_(True)
    per_token, _, ratio = losses.stable_reinforce_token_loss(
        lp, f32(RL_Q), f32(RL_ADV), SAMPLED, 0.01, truncated_is=True
    )
    per_token.sum().backward()
    r = [math.exp(a - b) for a, b in zip(RL_LP, RL_Q, strict=True)]
    expected_grad = [
        0.0 if i == 0 else -min(r[i], 1.0) * RL_ADV[i] + 0.01 * (r[i] - 1.0)
        for i in range(5)
    ]
    assert lp.grad is not None
    assert_close(lp.grad, expected_grad)
    assert_close(ratio[1:], r[1:])


def test_stable_reinforce_default_is_the_plain_reinforce_proposal() -> None:
    assert losses.STABLE_REINFORCE_TRUNCATED_IS is False


# ------------------------------------------------------------------------------
# Request validation
# ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_fn", "expected"),
    [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        ("dro", {"beta": 0.1}),
        ("gspo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("stable_reinforce", {"kl_coeff": 0.01}),
    ],
)
def test_validate_loss_request_fills_defaults(
    loss_fn: str, expected: dict[str, float]
) -> None:
    assert losses.validate_loss_request(loss_fn, None) == expected
    assert losses.validate_loss_request(loss_fn, {}) == expected


def test_loss_names_are_the_built_ins() -> None:
    assert {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "gspo",
        "stable_reinforce",
    } == losses.LOSS_NAMES


def test_validate_loss_request_keeps_given_values_as_floats() -> None:
    config = losses.validate_loss_request("ppo", {"clip_high_threshold": 2})
    assert config == {"clip_low_threshold": 0.8, "clip_high_threshold": 2.0}
    assert isinstance(config["clip_high_threshold"], float)


@pytest.mark.parametrize(
    ("loss_fn", "config", "message"),
    [
        ("foo", {}, "unknown loss_fn 'foo'"),
        ("custom", {"loss_id": "abc"}, "needs a loss created with ServiceClient.create_custom_loss"),
        ("ppo", {"clip_low": 0.8}, "unknown loss_fn_config key 'clip_low'"),
        ("cross_entropy", {"beta": 0.1}, "unknown loss_fn_config key 'beta'"),
        ("importance_sampling", {"clip_high_threshold": 1.2}, "clip_high_threshold"),
        ("dro", {"beta": float("nan")}, "must be finite"),
        ("ppo", {"clip_high_threshold": float("inf")}, "must be finite"),
        ("ppo", {"clip_low_threshold": 1.3}, "greater than"),
        (
            "gspo",
            {"clip_low_threshold": 1.0, "clip_high_threshold": 0.5},
            "greater than",
        ),
        ("cispo", {"clip_low_threshold": -0.1}, ">= 0"),
        ("stable_reinforce", {"kl_coeff": -0.01}, ">= 0"),
        ("dro", {"beta": "0.1"}, "must be a number"),
        ("ppo", {"clip_low_threshold": True}, "must be a number"),
    ],
)
def test_validate_loss_request_rejects(
    loss_fn: str, config: dict[str, object], message: str
) -> None:
    with pytest.raises(losses.LossInputError, match=re.escape(message)):
        losses.validate_loss_request(loss_fn, config)  # type: ignore[arg-type]


def test_loss_input_error_is_a_value_error() -> None:
    assert issubclass(losses.LossInputError, ValueError)


# ------------------------------------------------------------------------------
# Datum validation
# ------------------------------------------------------------------------------


def without(inputs: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != key}


CE_INPUTS = {"target_tokens": torch.tensor(CE_TARGETS), "weights": f32(CE_WEIGHTS)}

DATUM_REJECTIONS = [
    ("ppo", without(rl_inputs(), "advantages"), 5, "'advantages'"),
    ("importance_sampling", without(rl_inputs(), "logprobs"), 5, "'logprobs'"),
    ("stable_reinforce", without(rl_inputs(), "target_tokens"), 5, "'target_tokens'"),
    ("gspo", rl_inputs(sequence_ratio_mask=torch.zeros(4)), 5, "['sequence_ratio_mask'] must have shape"),
    ("cross_entropy", without(CE_INPUTS, "weights"), 3, "'weights'"),
    ("ppo", rl_inputs(), 6, "leading dimension 5"),
    ("ppo", rl_inputs(advantages=torch.zeros(4)), 5, "['advantages'] must have shape"),
    ("dro", rl_inputs(logprobs=torch.zeros(5, 1)), 5, "['logprobs'] must have shape"),
    ("cispo", rl_inputs(target_tokens=torch.zeros(5, 2, dtype=torch.int64)), 5, "(N,)"),
    ("cross_entropy", {**CE_INPUTS, "weights": torch.ones(3, 2)}, 3, "shape of target"),
    ("cross_entropy", {**CE_INPUTS, "target_tokens": torch.zeros(3)}, 3, "int64"),
    (
        "cross_entropy",
        {**CE_INPUTS, "weights": torch.ones(3, dtype=torch.int64)},
        3,
        "float32",
    ),
    ("ppo", rl_inputs(advantages=f32([0, 1, float("nan"), 0, 0])), 5, "non-finite"),
    ("cispo", rl_inputs(logprobs=f32([0, float("-inf"), 0, 0, 0])), 5, "non-finite"),
    (
        "cross_entropy",
        {**CE_INPUTS, "weights": f32([0, float("inf"), 1])},
        3,
        "non-finite",
    ),
    ("ppo", rl_inputs(advantages=[0.0] * 5), 5, "must be a tensor"),  # type: ignore
    ("ppo", rl_inputs(clip_low_threshold=torch.ones(4)), 5, "clip_low_threshold"),
    ("ppo", rl_inputs(clip_low_threshold=torch.full((5,), -0.5)), 5, "negative"),
    ("ppo", rl_inputs(clip_low_threshold=torch.full((5,), 1.5)), 5, "greater than"),
    ("nope", rl_inputs(), 5, "unknown loss_fn"),
]


@pytest.mark.parametrize(("loss_fn", "inputs", "n_tokens", "message"), DATUM_REJECTIONS)
def test_validate_datum_inputs_rejects(
    loss_fn: str, inputs: dict[str, torch.Tensor], n_tokens: int, message: str
) -> None:
    config = losses.validate_loss_request("ppo", None) if loss_fn == "ppo" else None
    with pytest.raises(losses.LossInputError, match=re.escape(message)):
        losses.validate_datum_inputs(loss_fn, inputs, n_tokens, config)


@pytest.mark.parametrize(
    ("loss_fn", "inputs", "n_tokens"),
    [
        ("cross_entropy", CE_INPUTS, 3),
        (
            "cross_entropy",
            {
                "target_tokens": torch.zeros(3, 4, dtype=torch.int64),
                "weights": torch.ones(3, 4),
            },
            3,
        ),
        # Unknown keys, even clip overrides for a loss without clipping, are ignored.
        (
            "importance_sampling",
            rl_inputs(mask=torch.ones(5), clip_low_threshold=torch.ones(7)),
            5,
        ),
        ("dro", rl_inputs(), 5),
        ("gspo", rl_inputs(clip_high_threshold=torch.tensor(1.5)), 5),
        ("stable_reinforce", rl_inputs(), 5),
    ],
)
def test_validate_datum_inputs_accepts(
    loss_fn: str, inputs: dict[str, torch.Tensor], n_tokens: int
) -> None:
    losses.validate_datum_inputs(loss_fn, inputs, n_tokens)


def test_compute_rejects_unknown_loss_and_missing_input() -> None:
    lp = torch.zeros(5, requires_grad=True)
    with pytest.raises(losses.LossInputError, match="unknown loss_fn"):
        losses.compute_datum_loss("bogus", lp, rl_inputs(), {})
    with pytest.raises(losses.LossInputError, match="'advantages'"):
        losses.compute_datum_loss("ppo", lp, without(rl_inputs(), "advantages"), {})


# ------------------------------------------------------------------------------
# Result shape, metric grammar and reduction
# ------------------------------------------------------------------------------

ALL_CASES = [
    ("cross_entropy", CE_LP, CE_INPUTS),
    *[
        (name, RL_LP, rl_inputs())
        for name in sorted(losses.LOSS_NAMES - {"cross_entropy"})
    ],
]


@pytest.mark.parametrize(("loss_fn", "lp_values", "inputs"), ALL_CASES)
def test_result_contract(
    loss_fn: str, lp_values: list[float], inputs: dict[str, torch.Tensor]
) -> None:
    result, grad = run_loss(loss_fn, lp_values, inputs)
    assert result.loss.dim() == 0
    assert result.loss.dtype == torch.float32
    assert torch.isfinite(grad).all()
    assert "loss:sum" in result.metrics
    assert result.metrics["loss:sum"] == pytest.approx(float(result.loss.detach()))
    for key, value in result.metrics.items():
        assert METRIC_KEY.fullmatch(key), key
        assert key.count(":") == 1
        assert isinstance(value, float) and math.isfinite(value)
    for name, tensor in result.extra_outputs.items():
        assert not tensor.requires_grad, name
        assert tensor.dtype == torch.float32
        assert tensor.shape == torch.Size([len(lp_values)])


@pytest.mark.parametrize("loss_fn", sorted(losses.LOSS_NAMES - {"cross_entropy"}))
def test_every_datum_of_a_loss_emits_the_same_metric_keys(loss_fn: str) -> None:
    # A very different datum: all-zero advantages, a shorter length, empty GSPO mask.
    other = {
        "target_tokens": torch.zeros(2, dtype=torch.int64),
        "logprobs": torch.zeros(2),
        "advantages": torch.zeros(2),
        "sequence_ratio_mask": torch.zeros(2),
    }
    first, _ = run_loss(loss_fn, RL_LP, rl_inputs())
    second, _ = run_loss(loss_fn, [-0.1, -3.0], other)
    assert first.metrics.keys() == second.metrics.keys()
    reduced = losses.reduce_metrics([first.metrics, second.metrics])
    assert reduced["loss:sum"] == pytest.approx(
        first.metrics["loss:sum"] + second.metrics["loss:sum"]
    )


def test_lp_in_other_dtypes_is_computed_in_fp32() -> None:
    for dtype in (torch.float64, torch.bfloat16):
        lp = torch.tensor(RL_LP, dtype=dtype, requires_grad=True)
        result = losses.compute_datum_loss("ppo", lp, rl_inputs(), {})
        assert result.loss.dtype == torch.float32
        result.loss.backward()
        assert lp.grad is not None and lp.grad.dtype == dtype


def test_reduce_metrics() -> None:
    per_datum = [
        {"loss:sum": 1.5, "clip_frac:mean": 0.5, "ratio:min": 0.9, "ratio:max": 1.1},
        {"loss:sum": -0.5, "clip_frac:mean": 0.0, "ratio:min": 0.7, "ratio:max": 1.3},
        {"loss:sum": 2.0, "clip_frac:mean": 1.0, "ratio:min": 0.8, "ratio:max": 1.0},
    ]
    assert losses.reduce_metrics(per_datum) == pytest.approx(
        {"loss:sum": 3.0, "clip_frac:mean": 0.5, "ratio:min": 0.7, "ratio:max": 1.3}
    )
    assert losses.reduce_metrics([]) == {}


def test_reduce_metrics_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="metric keys"):
        losses.reduce_metrics([{"loss:sum": 1.0}, {"loss:sum": 1.0, "x:mean": 0.0}])


@pytest.mark.parametrize("key", ["loss", "a:b:sum", "x:median", ":sum", "x:slack"])
def test_reduce_metrics_rejects_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not '<name>"):
        losses.reduce_metrics([{key: 1.0}])
