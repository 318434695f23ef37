"""Server-side math of Tinker's built-in loss functions.

Follows ``docs/losses.md`` (section numbers below refer to it). The training
engine calls :func:`compute_datum_loss` once per datum: the SDK splits large calls into
chunks that arrive as separate requests, so nothing here may depend on another datum
(docs/losses.md §1.1). Every loss is the *negative* of an objective, *summed* over tokens with no
normalisation (docs/losses.md §1.4); clients fold any averaging into ``advantages`` or ``weights``.

Notation (per datum, docs/losses.md §2): ``lp`` learner log-probs of ``target_tokens`` (with
gradient), ``q`` the sampler log-probs sent as ``loss_fn_inputs["logprobs"]``, ``A`` the
advantages, ``r = exp(lp - q)`` and ``sg`` = ``detach``.

Call order the engine should follow, so that a user error never surfaces after some
datums have already been back-propagated:

1. :func:`validate_loss_request` once per request (name and config);
2. :func:`validate_datum_inputs` (and, for ``stable_reinforce`` with recorded stability
   info, :func:`validate_stability_info`) for every datum;
3. forward pass, then :func:`compute_datum_loss` per datum;
4. :func:`reduce_metrics` over the per-datum metrics.

Pure torch: no tinker SDK types, no I/O.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tinkerd.engine import custom_loss
from tinkerd.loss_graph import LossGraph
from tinkerd.types import UserError

__all__ = [
    "CUSTOM",
    "LOSS_NAMES",
    "STABLE_REINFORCE_TRUNCATED_IS",
    "LossInputError",
    "LossResult",
    "StabilityInfo",
    "compute_datum_loss",
    "fallback_sampled_mask",
    "reduce_metrics",
    "stable_reinforce_token_loss",
    "validate_datum_inputs",
    "validate_loss_request",
    "validate_stability_info",
]


class LossInputError(UserError):
    """Bad user input (unknown loss, missing/ill-shaped input, bad config key/value).

    The server turns it into a ``user``-category failure; the message names what is
    wrong.
    """


@dataclass
class LossResult:
    """Outcome of one datum's loss."""

    # 0-d, differentiable w.r.t. target_logprobs: the summed (negative-objective) loss.
    loss: torch.Tensor
    # Keys are "<name>:<reduction>" with reduction in sum|mean|min|max; always has
    # "loss:sum". Per-datum values, combined by reduce_metrics.
    metrics: dict[str, float]
    # Optional detached per-token float outputs, e.g. "ratio" (docs/losses.md §1.5 PROPOSAL).
    extra_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StabilityInfo:
    """What the server recorded at sampling time, laid out on one datum's targets.

    Built by the engine from the datum's ``loss_fn_input_spans`` and the recorded
    sequences (docs/losses.md §2.7.2/§2.7.3); only ``stable_reinforce`` reads it.
    """

    # (N,) float: the sampler's own log-prob of target_tokens[i]; read only where
    # sampled_mask is set.
    sampler_logprobs: torch.Tensor
    # (N,) bool: target position i lies in a SampledProvenanceSpan (S of docs/losses.md §2.7.2).
    sampled_mask: torch.Tensor


# ------------------------------------------------------------------------------
# Per-loss tables
# ------------------------------------------------------------------------------

_CLIP_LOW = "clip_low_threshold"
_CLIP_HIGH = "clip_high_threshold"

# Accepted config keys and their defaults (docs/losses.md §2, §3). Keys not listed are rejected (docs/losses.md §1.7).
_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {_CLIP_LOW: 0.8, _CLIP_HIGH: 1.2},
    # One-sided by default: only the upper side is capped (cookbook 0.6.1 tutorial 202).
    "cispo": {_CLIP_LOW: 0.0, _CLIP_HIGH: 4.0},
    # No documented default; 0.1 is tinkerd's choice, a PROPOSAL (docs/losses.md §2.5, docs/losses.md §7.5).
    "dro": {"beta": 0.1},
    # Key names and defaults inferred by analogy with PPO (docs/losses.md §2.6, docs/losses.md §7.4).
    "gspo": {_CLIP_LOW: 0.8, _CLIP_HIGH: 1.2},
    "stable_reinforce": {"kl_coeff": 0.01},
}

LOSS_NAMES: frozenset[str] = frozenset(_CONFIG_DEFAULTS)
# A loss the user defined with create_custom_loss (docs/losses.md §2.8): its config carries the checked graph
# (engine/custom_loss.py), which the server put there in place of the request's loss_id.
CUSTOM = "custom"

_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    # sequence_ratio_mask is optional (_OPTIONAL_INPUTS): tinker-cookbook's RL loop
    # (rl/train.py, e.g. math_rl loss_fn=gspo) never sends it.
    "gspo": ("target_tokens", "logprobs", "advantages"),
    # logprobs stays required even though recorded stability info wins over it: the
    # cookbook always sends it and it is the fallback while no record is wired in.
    "stable_reinforce": ("target_tokens", "logprobs", "advantages"),
}

# Per-token float inputs a loss reads when present; checked like required ones then.
_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"gspo": ("sequence_ratio_mask",)}

# Losses whose clip bounds a datum may override per token with float inputs of the same
# name (PROPOSAL docs/losses.md §2.3, docs/losses.md §7.6). Other losses ignore those keys like any unknown input.
_PER_TOKEN_CLIP_LOSSES: frozenset[str] = frozenset({"ppo", "cispo", "gspo"})

# Config values that must be >= 0: negative clip bounds are rejected by docs/losses.md §1.7; a negative
# DRO beta or KL coefficient would reward drifting away from the sampler, which no
# caller can mean, so those are rejected too.
_NON_NEGATIVE_CONFIG_KEYS: frozenset[str] = frozenset(
    {_CLIP_LOW, _CLIP_HIGH, "beta", "kl_coeff"}
)

_METRIC_REDUCTIONS: frozenset[str] = frozenset({"sum", "mean", "min", "max"})


def _require_known_loss(loss_fn: str) -> None:
    if loss_fn not in LOSS_NAMES:
        raise LossInputError(
            f"unknown loss_fn {loss_fn!r}; built-in losses are {sorted(LOSS_NAMES)}"
        )


# ------------------------------------------------------------------------------
# Request-level validation
# ------------------------------------------------------------------------------


def validate_loss_request(
    loss_fn: str, config: Mapping[str, float | str] | None
) -> dict[str, float | str]:
    """Check the loss name and its config once per request; return config with defaults.

    Unknown keys are rejected because a typo would otherwise change training silently
    (docs/losses.md §1.7). Values come back as plain Python floats. For ``custom``, the
    config's graph comes back rebuilt as ``{"evaluator": CompiledLoss}``.
    """
    if loss_fn == CUSTOM:
        graph = (config or {}).get("graph")
        if not isinstance(graph, LossGraph):
            raise LossInputError("loss_fn 'custom' needs a loss created with ServiceClient.create_custom_loss")
        return {"evaluator": custom_loss.compile_loss(graph)}  # type: ignore[dict-item]
    _require_known_loss(loss_fn)
    defaults = _CONFIG_DEFAULTS[loss_fn]
    given = dict(config or {})
    for key, value in given.items():
        if key not in defaults:
            allowed = sorted(defaults) or "none"
            raise LossInputError(
                f"unknown loss_fn_config key {key!r} for loss_fn {loss_fn!r} "
                f"(accepted keys: {allowed})"
            )
        # bool is an Integral; a True/False threshold is certainly a client bug.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LossInputError(
                f"loss_fn_config[{key!r}] must be a number, "
                f"got {type(value).__name__} {value!r}"
            )
        if not math.isfinite(float(value)):
            raise LossInputError(
                f"loss_fn_config[{key!r}] must be finite, got {value!r}"
            )
    resolved: dict[str, float | str] = {key: float(v) for key, v in defaults.items()}
    resolved.update({key: float(v) for key, v in given.items()})
    for key in sorted(_NON_NEGATIVE_CONFIG_KEYS & resolved.keys()):
        if float(resolved[key]) < 0:
            raise LossInputError(
                f"loss_fn_config[{key!r}] must be >= 0, got {resolved[key]!r}"
            )
    if _CLIP_LOW in resolved and float(resolved[_CLIP_LOW]) > float(
        resolved[_CLIP_HIGH]
    ):
        raise LossInputError(
            f"{_CLIP_LOW} ({resolved[_CLIP_LOW]}) is greater than "
            f"{_CLIP_HIGH} ({resolved[_CLIP_HIGH]})"
        )
    return resolved


def _config_float(loss_fn: str, config: Mapping[str, float | str], key: str) -> float:
    # Falls back to the default so that a caller that skipped validate_loss_request
    # still gets the documented behaviour rather than a KeyError.
    return float(config.get(key, _CONFIG_DEFAULTS[loss_fn][key]))


# ------------------------------------------------------------------------------
# Datum-level validation
# ------------------------------------------------------------------------------


def _check_flags(checks: list[tuple[str, torch.Tensor]]) -> None:
    """Raise LossInputError for the first failing 0-d bool check.

    All flags are fetched in one host transfer, so validation costs one device sync per
    datum instead of one per tensor.
    """
    if not checks:
        return
    device = checks[0][1].device
    flags = torch.stack([flag.reshape(()).to(device) for _, flag in checks]).tolist()
    for (message, _), ok in zip(checks, flags, strict=True):
        if not ok:
            raise LossInputError(message)


def _input_tensor(
    loss_fn: str, inputs: Mapping[str, torch.Tensor], key: str
) -> torch.Tensor:
    if key not in inputs:
        raise LossInputError(
            f"loss_fn {loss_fn!r} requires loss_fn_inputs[{key!r}], which is missing"
        )
    value = inputs[key]
    if not isinstance(value, torch.Tensor):
        raise LossInputError(
            f"loss_fn_inputs[{key!r}] must be a tensor, got {type(value).__name__}"
        )
    return value


def _check_float_dtype(key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise LossInputError(
            f"loss_fn_inputs[{key!r}] must be float32, got {tensor.dtype}"
        )


def _check_target_tokens(loss_fn: str, tokens: torch.Tensor, n_tokens: int) -> None:
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise LossInputError(
            f"loss_fn_inputs['target_tokens'] must be int64, got {tokens.dtype}"
        )
    # (N, K) targets are top-K soft-target distillation, defined only for cross_entropy.
    allowed_ranks = (1, 2) if loss_fn == "cross_entropy" else (1,)
    if tokens.dim() not in allowed_ranks:
        expected = "(N,) or (N, K)" if loss_fn == "cross_entropy" else "(N,)"
        raise LossInputError(
            f"loss_fn_inputs['target_tokens'] for {loss_fn!r} must have shape "
            f"{expected}, got {tuple(tokens.shape)}"
        )
    if tokens.shape[0] != n_tokens:
        raise LossInputError(
            f"loss_fn_inputs['target_tokens'] has leading dimension {tokens.shape[0]}, "
            f"but model_input has length {n_tokens}"
        )


def _check_per_token_float(key: str, tensor: torch.Tensor, n_tokens: int) -> None:
    _check_float_dtype(key, tensor)
    if tuple(tensor.shape) != (n_tokens,):
        raise LossInputError(
            f"loss_fn_inputs[{key!r}] must have shape ({n_tokens},) to match "
            f"model_input, got {tuple(tensor.shape)}"
        )


def _check_clip_override(key: str, tensor: torch.Tensor, n_tokens: int) -> None:
    _check_float_dtype(key, tensor)
    if tuple(tensor.shape) not in ((), (n_tokens,)):
        raise LossInputError(
            f"loss_fn_inputs[{key!r}] must be a scalar or have shape ({n_tokens},), "
            f"got {tuple(tensor.shape)}"
        )


def _clip_order_check(
    low: torch.Tensor, high: torch.Tensor
) -> tuple[str, torch.Tensor]:
    return (
        f"{_CLIP_LOW} is greater than {_CLIP_HIGH} at some target position",
        (low <= high).all(),
    )


def validate_datum_inputs(
    loss_fn: str,
    inputs: Mapping[str, torch.Tensor],
    n_tokens: int,
    config: Mapping[str, float | str] | None = None,
) -> None:
    """Check one datum's ``loss_fn_inputs`` before any forward/backward work.

    Required keys, dtypes, shapes (leading dim == ``n_tokens``; ``(N, K)`` targets and
    weights only for cross_entropy) and finiteness (docs/losses.md §1.7). Unknown keys are ignored: RL
    datums legitimately carry e.g. ``weights`` or ``mask`` (docs/losses.md §1.2, docs/losses.md §1.7). Passing the
    validated request ``config`` also checks per-token clip overrides against it; a
    ``custom`` loss needs it, and checks the datum against the loss's declared inputs.
    """
    if loss_fn == CUSTOM:
        evaluator = (config or {}).get("evaluator")
        if not isinstance(evaluator, custom_loss.CompiledLoss):
            raise LossInputError("loss_fn 'custom' needs the validated config of validate_loss_request")
        evaluator.check_datum(inputs, n_tokens)
        return
    _require_known_loss(loss_fn)
    tokens = _input_tensor(loss_fn, inputs, "target_tokens")
    _check_target_tokens(loss_fn, tokens, n_tokens)
    finite_checks: list[tuple[str, torch.Tensor]] = []

    if loss_fn == "cross_entropy":
        weights = _input_tensor(loss_fn, inputs, "weights")
        _check_float_dtype("weights", weights)
        if weights.shape != tokens.shape:
            raise LossInputError(
                f"loss_fn_inputs['weights'] must have the shape of target_tokens "
                f"{tuple(tokens.shape)}, got {tuple(weights.shape)}"
            )
        # Any finite sign or size is legal: the custom-loss path sends -dC/dlp (docs/losses.md §2.1).
        finite_checks.append(
            (
                "loss_fn_inputs['weights'] contains a non-finite value",
                torch.isfinite(weights).all(),
            )
        )
    else:
        present_optional = [k for k in _OPTIONAL_INPUTS.get(loss_fn, ()) if k in inputs]
        for key in (*_REQUIRED_INPUTS[loss_fn][1:], *present_optional):
            tensor = _input_tensor(loss_fn, inputs, key)
            _check_per_token_float(key, tensor, n_tokens)
            finite_checks.append(
                (
                    f"loss_fn_inputs[{key!r}] contains a non-finite value",
                    torch.isfinite(tensor).all(),
                )
            )

    if loss_fn in _PER_TOKEN_CLIP_LOSSES:
        overrides: dict[str, torch.Tensor] = {}
        for key in (_CLIP_LOW, _CLIP_HIGH):
            if key in inputs:
                tensor = _input_tensor(loss_fn, inputs, key)
                _check_clip_override(key, tensor, n_tokens)
                overrides[key] = tensor
                finite_checks.append(
                    (
                        f"loss_fn_inputs[{key!r}] contains a non-finite value",
                        torch.isfinite(tensor).all(),
                    )
                )
                finite_checks.append(
                    (
                        f"loss_fn_inputs[{key!r}] contains a negative value",
                        (tensor >= 0).all(),
                    )
                )
        if overrides and (config is not None or len(overrides) == 2):
            low, high = _clip_bounds(
                loss_fn, inputs, config or {}, torch.float32, tokens.device
            )
            finite_checks.append(_clip_order_check(low, high))

    _check_flags(finite_checks)


def validate_stability_info(advantages: torch.Tensor, stability: StabilityInfo) -> None:
    """Check a datum's recorded stability info against its advantages (docs/losses.md §2.7.3).

    User errors: no sampled target position at all, or a nonzero advantage on a target
    that no SampledProvenanceSpan covers. A shape mismatch is an engine bug
    (plain ValueError).
    """
    n_tokens = advantages.shape[0]
    for name, tensor in (
        ("sampler_logprobs", stability.sampler_logprobs),
        ("sampled_mask", stability.sampled_mask),
    ):
        if tuple(tensor.shape) != (n_tokens,):
            raise ValueError(
                f"StabilityInfo.{name} has shape {tuple(tensor.shape)}, "
                f"expected ({n_tokens},)"
            )
    sampled = stability.sampled_mask.to(device=advantages.device, dtype=torch.bool)
    recorded = stability.sampler_logprobs.to(
        device=advantages.device, dtype=torch.float32
    )
    flags = torch.stack(
        [
            sampled.any(),
            ((advantages == 0) | sampled).all(),
            (torch.isfinite(recorded) | ~sampled).all(),
        ]
    ).tolist()
    if not flags[0]:
        raise LossInputError(
            "stable_reinforce: the datum's provenance covers no sampled target token "
            "(loss_fn_input_spans needs a SampledProvenanceSpan of nonzero length)"
        )
    if not flags[1]:
        bad = int(((advantages != 0) & ~sampled).nonzero()[0, 0])
        raise LossInputError(
            "stable_reinforce accepts nonzero advantages only on sampled target "
            f"positions; advantages[{bad}] = {float(advantages[bad])} lies outside "
            "every SampledProvenanceSpan"
        )
    if not flags[2]:
        raise ValueError(
            "StabilityInfo.sampler_logprobs is non-finite at a sampled position"
        )


# ------------------------------------------------------------------------------
# Shared pieces of the RL losses
# ------------------------------------------------------------------------------


def _float_input(
    loss_fn: str, inputs: Mapping[str, torch.Tensor], key: str, like: torch.Tensor
) -> torch.Tensor:
    """A required float input as fp32 on lp's device; must have lp's shape."""
    tensor = _input_tensor(loss_fn, inputs, key)
    if tensor.shape != like.shape:
        raise LossInputError(
            f"loss_fn_inputs[{key!r}] has shape {tuple(tensor.shape)}, "
            f"expected {tuple(like.shape)}"
        )
    return tensor.to(device=like.device, dtype=torch.float32)


def _clip_bounds(
    loss_fn: str,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) ratio bounds: per-token inputs override the config scalars (docs/losses.md §2.3)."""

    def bound(key: str) -> torch.Tensor:
        if key in inputs:
            return inputs[key].to(device=device, dtype=dtype)
        return torch.tensor(
            _config_float(loss_fn, config, key), dtype=dtype, device=device
        )

    return bound(_CLIP_LOW), bound(_CLIP_HIGH)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Per-token PPO objective min(r*A, clamp(r, lo, hi)*A) (docs/losses.md §2.3).

    torch.minimum/torch.clamp give exactly the documented gradients: zero where the
    clipped branch is the active minimum, -r*A (after negation) elsewhere.
    """
    return torch.minimum(ratio * advantages, torch.clamp(ratio, low, high) * advantages)


def _fraction(mask: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Share of ``among`` positions where ``mask`` holds; 0 if ``among`` is empty."""
    count = among.sum()
    return (mask & among).sum().to(torch.float32) / count.clamp(min=1).to(torch.float32)


def _ppo_clip_fraction(
    ratio: torch.Tensor, advantages: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    # A token counts as clipped when the clipped branch is strictly the active minimum,
    # i.e. it gets no gradient; prompt positions (A == 0) do not count at all.
    clipped = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
    return _fraction(clipped, advantages != 0)


def _finish(
    loss: torch.Tensor,
    metrics: Mapping[str, torch.Tensor],
    extra: Mapping[str, torch.Tensor],
) -> LossResult:
    """Pack a LossResult, moving all metric values to the host in one transfer."""
    names = ["loss:sum", *metrics]
    values = torch.stack(
        [
            loss.detach().to(torch.float32),
            *(m.detach().to(torch.float32) for m in metrics.values()),
        ]
    ).tolist()
    return LossResult(
        loss=loss,
        metrics=dict(zip(names, values, strict=True)),
        extra_outputs={key: value.detach() for key, value in extra.items()},
    )


# ------------------------------------------------------------------------------
# The losses. Each takes fp32 lp and returns the datum's LossResult.
# ------------------------------------------------------------------------------

_LossImpl = Callable[
    [
        torch.Tensor,
        Mapping[str, torch.Tensor],
        Mapping[str, float | str],
        StabilityInfo | None,
    ],
    LossResult,
]


def _cross_entropy(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.1: loss = sum_{i,k} -lp[i,k] * w[i,k]; weights are used as given (no clamp or
    # normalisation) because the custom-loss path encodes arbitrary gradients in them.
    weights = _float_input("cross_entropy", inputs, "weights", like=lp)
    return _finish(-(lp * weights).sum(), {}, {})


def _rl_inputs(
    loss_fn: str, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if lp.dim() != 1:
        raise LossInputError(
            f"{loss_fn!r} needs (N,) target_tokens, got shape {tuple(lp.shape)}"
        )
    return (
        _float_input(loss_fn, inputs, "logprobs", like=lp),
        _float_input(loss_fn, inputs, "advantages", like=lp),
    )


def _importance_sampling(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.2: loss = -sum_i r_i * A_i, ratio unclipped. A_i = 0 on prompt positions
    # removes them whatever their padded q.
    sampler_lp, advantages = _rl_inputs("importance_sampling", lp, inputs)
    ratio = torch.exp(lp - sampler_lp)
    return _finish(-(ratio * advantages).sum(), {}, {"ratio": ratio})


def _ppo(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.3: loss = -sum_i min(r_i A_i, clamp(r_i, lo, hi) A_i), with lo/hi absolute
    # ratio bounds (not epsilons).
    sampler_lp, advantages = _rl_inputs("ppo", lp, inputs)
    low, high = _checked_clip_bounds("ppo", inputs, config, lp)
    ratio = torch.exp(lp - sampler_lp)
    loss = -_clipped_surrogate(ratio, advantages, low, high).sum()
    metrics = {
        "clip_frac:mean": _ppo_clip_fraction(ratio.detach(), advantages, low, high)
    }
    return _finish(loss, metrics, {"ratio": ratio})


def _cispo(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.4: loss = -sum_i sg(clamp(r_i, lo, hi)) * lp_i * A_i. The clipped ratio is only
    # a detached weight, so every token keeps its REINFORCE gradient.
    sampler_lp, advantages = _rl_inputs("cispo", lp, inputs)
    low, high = _checked_clip_bounds("cispo", inputs, config, lp)
    ratio = torch.exp(lp - sampler_lp).detach()
    loss = -(torch.clamp(ratio, low, high) * lp * advantages).sum()
    # Clipped here means the clamp changed the weight, on either side.
    clipped = (ratio < low) | (ratio > high)
    metrics = {"clip_frac:mean": _fraction(clipped, advantages != 0)}
    return _finish(loss, metrics, {"ratio": ratio})


def _dro(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.5: loss = -sum_i [lp_i A_i - beta/2 (lp_i - q_i)^2]. The quadratic term is
    # unmasked, as documented: prompt positions padded with q = 0 are pulled toward
    # lp = 0 (the caveat of docs/losses.md §2.5; clients should pad with true log-probs if they care).
    sampler_lp, advantages = _rl_inputs("dro", lp, inputs)
    beta = _config_float("dro", config, "beta")
    log_ratio = lp - sampler_lp
    loss = -(lp * advantages - 0.5 * beta * log_ratio.square()).sum()
    return _finish(loss, {}, {"ratio": torch.exp(log_ratio.detach())})


def _gspo(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    # docs/losses.md §2.6 (GSPO-token): one ratio per datum, s = exp(mean_{i in M}(sg(lp_i) - q_i)).
    # Every token shares its value; each token's gradient flows through its own lp_i.
    sampler_lp, advantages = _rl_inputs("gspo", lp, inputs)
    if "sequence_ratio_mask" in inputs:
        in_ratio = _float_input("gspo", inputs, "sequence_ratio_mask", like=lp) != 0
    else:
        # No mask (the cookbook's RL loop sends none): the ratio is taken over the sampled
        # positions, recognised as stable_reinforce does without provenance (prompt
        # positions are padded with q = 0 and A = 0), never over q = 0 padding.
        in_ratio = fallback_sampled_mask(sampler_lp, advantages)
    low, high = _checked_clip_bounds("gspo", inputs, config, lp)
    token_log_ratio = torch.where(
        in_ratio, lp.detach() - sampler_lp, torch.zeros_like(lp)
    )
    # Empty mask -> s_log = 0 (ratio 1), not the NaN of an empty mean (PROPOSAL docs/losses.md §2.6).
    seq_log_ratio = token_log_ratio.sum() / in_ratio.sum().clamp(min=1).to(
        torch.float32
    )
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    loss = -_clipped_surrogate(ratio, advantages, low, high).sum()
    metrics = {
        "clip_frac:mean": _ppo_clip_fraction(ratio.detach(), advantages, low, high),
        "seq_ratio:mean": torch.exp(seq_log_ratio),
    }
    return _finish(loss, metrics, {"ratio": ratio})


def _checked_clip_bounds(
    loss_fn: str,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    lp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = _clip_bounds(loss_fn, inputs, config, torch.float32, lp.device)
    # Config bounds were ordered by validate_loss_request; per-token overrides are only
    # re-checked here (costs a sync) for callers that skipped validate_datum_inputs.
    if _CLIP_LOW in inputs or _CLIP_HIGH in inputs:
        _check_flags([_clip_order_check(low, high)])
    return low, high


# ==============================================================================
# PROPOSAL ZONE: StableReinforce (docs/losses.md §2.7.2, docs/losses.md §7.1-docs/losses.md §7.3)
#
# The real StableReinforce objective is not public. Every guess about it lives in the
# two functions below; correct them here when the full docs page becomes available.
#   * stable_reinforce_token_loss: the per-token formula (REINFORCE on sampled tokens
#     plus kl_coeff * k3 estimate of KL(sampler || learner)), with the A/B
#     alternative of docs/losses.md §2.7.2 (detached truncated IS weight) behind STABLE_REINFORCE_TRUNCATED_IS.
#   * fallback_sampled_mask: which positions count as sampled when the engine has no
#     recorded provenance for the datum.
# The plumbing (validation, recorded-vs-client log-prob choice) is in
# _stable_reinforce below.
# ==============================================================================

# False: loss = sum_S[-A lp + kl_coeff * k3]; True: the REINFORCE term is weighted by
# sg(min(r, 1)), the variant of docs/losses.md §2.7.2.
STABLE_REINFORCE_TRUNCATED_IS: bool = False


def stable_reinforce_token_loss(
    lp: torch.Tensor,
    sampler_lp: torch.Tensor,
    advantages: torch.Tensor,
    sampled: torch.Tensor,
    kl_coeff: float,
    *,
    truncated_is: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PROPOSAL per-token StableReinforce loss.

    Returns ``(per_token_loss, k3, ratio)``; ``k3`` and ``ratio`` are detached, and all
    three are 0, 0 and 1 respectively off the sampled set.

    ``per_token_loss[i] = -w_i * A_i * lp_i + kl_coeff * (r_i - 1 - log r_i)`` on
    sampled positions and 0 elsewhere, with ``w_i = 1`` (or ``sg(min(r_i, 1))`` when
    ``truncated_is``). The REINFORCE term has no importance weight, so no ratio can blow
    up; the k3 term is a non-negative KL(sampler || learner) estimate whose gradient
    ``kl_coeff * (r_i - 1)`` pulls the learner back toward the sampler.
    """
    if truncated_is is None:
        truncated_is = STABLE_REINFORCE_TRUNCATED_IS
    # Off S, q may be padding or garbage; replacing it by sg(lp) makes r = 1 there, so
    # the unselected branch of torch.where stays finite and cannot leak NaN into the
    # gradient (where's backward multiplies by 0, and 0 * inf = NaN).
    safe_sampler_lp = torch.where(sampled, sampler_lp, lp.detach())
    log_ratio = lp - safe_sampler_lp
    ratio = torch.exp(log_ratio)
    pg_weight = (
        ratio.detach().clamp(max=1.0) if truncated_is else torch.ones_like(ratio)
    )
    k3 = ratio - 1.0 - log_ratio
    per_token = -pg_weight * advantages * lp + kl_coeff * k3
    zeros = torch.zeros_like(per_token)
    return (
        torch.where(sampled, per_token, zeros),
        torch.where(sampled, k3.detach(), zeros.detach()),
        ratio.detach(),
    )


def fallback_sampled_mask(
    client_logprobs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """PROPOSAL: the sampled set S when no stability info was recorded for the datum.

    Clients pad prompt positions with logprobs = 0 and advantages = 0 (docs/losses.md §1.2), so a
    target counts as sampled when either is nonzero. The only sampled tokens this
    misses have zero advantage and a sampler log-prob of exactly 0 (p = 1 in fp32);
    they merely lose their KL term, which only weakens the regulariser there.
    """
    return (client_logprobs != 0) | (advantages != 0)


# ========================== end of PROPOSAL ZONE ==============================


def _stable_reinforce(
    lp: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None,
) -> LossResult:
    client_lp, advantages = _rl_inputs("stable_reinforce", lp, inputs)
    kl_coeff = _config_float("stable_reinforce", config, "kl_coeff")
    if stability is None:
        sampled = fallback_sampled_mask(client_lp, advantages)
        sampler_lp = client_lp
        mismatch = torch.zeros((), dtype=torch.float32, device=lp.device)
    else:
        validate_stability_info(advantages, stability)
        sampled = stability.sampled_mask.to(device=lp.device, dtype=torch.bool)
        recorded = stability.sampler_logprobs.to(device=lp.device, dtype=torch.float32)
        # The server's own record wins over what the client sent (PROPOSAL docs/losses.md §7.3); the
        # largest disagreement is reported so drifting clients are visible.
        sampler_lp = torch.where(sampled, recorded, client_lp)
        mismatch = torch.where(
            sampled, (recorded - client_lp).abs(), torch.zeros_like(client_lp)
        ).amax()
    per_token, k3, ratio = stable_reinforce_token_loss(
        lp, sampler_lp, advantages, sampled, kl_coeff
    )
    metrics = {
        # Per-token mean of the k3 KL(sampler || learner) estimate over S (0 if empty).
        "sampler_kl:mean": k3.sum() / sampled.sum().clamp(min=1).to(torch.float32),
        "sampler_logprob_mismatch:max": mismatch,
    }
    # The ratio output is 1 off S, where no sampler log-prob is meaningful.
    return _finish(per_token.sum(), metrics, {"ratio": ratio})


_LOSS_IMPLS: dict[str, _LossImpl] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
}
assert _LOSS_IMPLS.keys() == LOSS_NAMES == _REQUIRED_INPUTS.keys()


def compute_datum_loss(
    loss_fn: str,
    target_logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
    stability: StabilityInfo | None = None,
) -> LossResult:
    """Loss, metrics and extra outputs of one datum.

    ``target_logprobs``: learner log-probs of ``target_tokens``, shape ``(N,)`` or
    ``(N, K)``, requiring grad; the math runs in fp32 whatever its dtype. ``inputs``:
    the datum's dense ``loss_fn_inputs``. ``config``: output of validate_loss_request.
    ``stability``: recorded sampling info (read by stable_reinforce only).
    """
    if loss_fn == CUSTOM:
        result = config["evaluator"](target_logprobs.to(torch.float32), inputs)  # type: ignore[operator]
        return LossResult(loss=result.loss, metrics=result.metrics)
    _require_known_loss(loss_fn)
    tokens = _input_tensor(loss_fn, inputs, "target_tokens")
    if target_logprobs.shape != tokens.shape:
        # The engine derives target_logprobs from target_tokens, so this is its bug.
        raise ValueError(
            f"target_logprobs shape {tuple(target_logprobs.shape)} != "
            f"target_tokens shape {tuple(tokens.shape)}"
        )
    lp = target_logprobs.to(torch.float32)
    return _LOSS_IMPLS[loss_fn](lp, inputs, config, stability)


# ------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------


def _metric_reduction(key: str) -> str:
    name, sep, reduction = key.partition(":")
    if not sep or not name or ":" in reduction or reduction not in _METRIC_REDUCTIONS:
        raise ValueError(f"metric key {key!r} is not '<name>:<sum|mean|min|max>'")
    return reduction


def reduce_metrics(per_datum: list[dict[str, float]]) -> dict[str, float]:
    """Combine one request's per-datum metrics by key suffix (docs/losses.md §1.6).

    ``:sum`` is summed, ``:mean`` averaged over datums (the SDK then weights each
    chunk's mean by its datum count), ``:min``/``:max`` as named. Every datum must carry
    the same keys, since the SDK drops a key missing from any chunk. Returns {} for no
    datums.
    """
    if not per_datum:
        return {}
    keys = list(per_datum[0])
    for index, metrics in enumerate(per_datum):
        if metrics.keys() != per_datum[0].keys():
            raise ValueError(
                f"datum {index} has metric keys {sorted(metrics)}, "
                f"expected {sorted(keys)}"
            )
    reduced: dict[str, float] = {}
    for key in keys:
        values = [float(metrics[key]) for metrics in per_datum]
        reduction = _metric_reduction(key)
        if reduction == "sum":
            reduced[key] = math.fsum(values)
        elif reduction == "mean":
            reduced[key] = math.fsum(values) / len(values)
        elif reduction == "min":
            reduced[key] = min(values)
        else:
            reduced[key] = max(values)
    return reduced
