"""Training for one base model: LoRA adapters, their AdamW state, forward/backward passes,
and saving / loading them as PEFT checkpoints.

Runs on the engine thread only (the scheduler calls it). Calls of several adapters may
share one pass: each adapter's LoRA sees only its own rows, so its gradient comes only
from its own datums. docs/engine.md says how passes are cut.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinkerd.engine import losses
from tinkerd.engine.model import AdapterBatch, AdapterSegment, LlamaModel, LoraWeights, init_lora, lora_module_paths
from tinkerd.engine.peft_io import read_checkpoint_dir, read_optimizer, write_checkpoint_dir
from tinkerd.types import AdamParams, Datum, ForwardBackwardCall, LoraSpec, TrainResult, UserError

TOKENS_PER_TRAIN_PASS = 4096  # caps activation memory of one forward/backward pass (or prefill)
# On CPU a training pass stays within this many padded tokens (more passes, the gradients
# summed): past ~1k tokens the activations and [tokens, vocab] logits outgrow the caches and
# tokens/s fell (2048 tokens in one pass: ~185 tok/s against ~250 in passes of 512, on 2 cores).
CPU_TOKENS_PER_TRAIN_PASS = 512


@dataclass
class TrainableAdapter:
    spec: LoraSpec
    weights: LoraWeights
    optimizer: torch.optim.AdamW
    params: dict[str, torch.nn.Parameter]


@dataclass
class PreparedCall:
    """A validated forward/backward call, ready to share a pass with others."""

    adapter: TrainableAdapter
    datums: list[Datum]
    loss_fn: str
    config: dict


class Trainer:
    def __init__(self, model: LlamaModel, base_model: str, on_sampler_snapshot: Callable[[str, LoraWeights], None]):
        self.model = model
        self.cfg = model.cfg
        self.device = model.device
        self.base_model = base_model
        self.adapters: dict[str, TrainableAdapter] = {}
        # save_adapter with a sampler key hands a snapshot to the sampler's cache, so the first
        # sample of a fresh checkpoint does not wait for a disk read.
        self._on_sampler_snapshot = on_sampler_snapshot
        self.train_pass_tokens = CPU_TOKENS_PER_TRAIN_PASS if self.device.type == "cpu" else TOKENS_PER_TRAIN_PASS
        self.stats = {"forward_backward_calls": 0, "forward_backward_passes": 0}

    # -- adapters --------------------------------------------------------------------------

    def _new_trainable(self, spec: LoraSpec, weights: LoraWeights | None = None) -> TrainableAdapter:
        if weights is None:
            paths = lora_module_paths(self.cfg, spec.train_attn, spec.train_mlp, spec.train_unembed)
            weights = init_lora(self.cfg, paths, spec.rank, spec.alpha, spec.seed, self.device)
        params: dict[str, torch.nn.Parameter] = {}
        for path in weights.a:
            params[f"{path}.A"] = torch.nn.Parameter(weights.a[path].float().clone())
            params[f"{path}.B"] = torch.nn.Parameter(weights.b[path].float().clone())
            weights.a[path] = params[f"{path}.A"]
            weights.b[path] = params[f"{path}.B"]
        # fused: one kernel updates every tensor of the adapter (r=8 on attention and MLP is 420
        # small tensors for SmolLM2; stepping them one by one cost a small step ~10 % of its time).
        optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                      fused=True)
        return TrainableAdapter(spec=spec, weights=weights, optimizer=optimizer, params=params)

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> None:
        if spec.rank < 1:
            raise UserError(f"lora rank must be >= 1, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise UserError("at least one of train_attn, train_mlp, train_unembed must be true")
        self.adapters[adapter_id] = self._new_trainable(spec)

    def drop_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def adapter(self, adapter_id: str) -> TrainableAdapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise UserError(f"model {adapter_id!r} is not loaded") from None

    def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool, sampler_key: str | None = None) -> int:
        """Write the adapter (and optionally its optimizer) to `directory`; returns bytes written."""
        adapter = self.adapter(adapter_id)
        spec = adapter.spec
        opt_tensors = opt_meta = None
        if with_optimizer:
            opt_tensors, opt_meta = self._optimizer_tensors(adapter)
        extra = {"train_attn": spec.train_attn, "train_mlp": spec.train_mlp, "train_unembed": spec.train_unembed, "seed": spec.seed}
        size = write_checkpoint_dir(Path(directory), adapter.weights, spec.rank, spec.alpha, self.base_model, extra,
                                    opt_tensors, opt_meta)
        if sampler_key is not None:
            self._on_sampler_snapshot(sampler_key, self.sampler_copy(adapter_id))
        return size

    def sampler_copy(self, adapter_id: str) -> LoraWeights:
        """A copy of the adapter's LoRA weights for the sampler: later optimizer steps do not reach it."""
        weights = self.adapter(adapter_id).weights
        return LoraWeights(
            a={k: v.detach().clone() for k, v in weights.a.items()},
            b={k: v.detach().clone() for k, v in weights.b.items()},
            scale=weights.scale,
        )

    @staticmethod
    def _optimizer_tensors(adapter: TrainableAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, str] = {}
        for name, param in adapter.params.items():
            state = adapter.optimizer.state.get(param)
            if not state:
                continue
            tensors[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            steps[name] = str(float(state["step"]))
        return tensors, {"steps": json.dumps(steps)}

    def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> LoraSpec:
        """Create (or replace) a trainable adapter from a checkpoint directory."""
        config, weights = read_checkpoint_dir(Path(directory), self.device)
        extra = config.get("tinkerd", {})
        paths = list(weights.a)
        spec = LoraSpec(
            rank=int(config["r"]),
            train_attn=extra.get("train_attn", any(".self_attn." in p for p in paths)),
            train_mlp=extra.get("train_mlp", any(".mlp." in p for p in paths)),
            train_unembed=extra.get("train_unembed", "lm_head" in paths),
            seed=int(extra.get("seed", 0)),
            alpha=float(config["lora_alpha"]),
        )
        expected = set(lora_module_paths(self.cfg, spec.train_attn, spec.train_mlp, spec.train_unembed))
        unknown = set(paths) - set(lora_module_paths(self.cfg, True, True, True))
        if unknown:
            raise UserError(f"checkpoint has LoRA weights for modules this model does not have: {sorted(unknown)[:3]}")
        missing = sorted(expected - set(paths))
        if missing:
            # A PEFT adapter may target a subset of a flag's modules: the rest start as a fresh
            # LoRA (random A, zero B) — unchanged outputs, but trainable (zero A and B would
            # never receive a gradient).
            fresh = init_lora(self.cfg, missing, spec.rank, spec.alpha, spec.seed, self.device)
            weights.a.update(fresh.a)
            weights.b.update(fresh.b)
        adapter = self._new_trainable(spec, weights)
        if with_optimizer:
            loaded = read_optimizer(Path(directory))
            if loaded is None:
                raise UserError(f"checkpoint {Path(directory).name} has no optimizer state")
            tensors, meta = loaded
            steps = json.loads(meta.get("steps", "{}"))
            for name, param in adapter.params.items():
                if f"{name}.exp_avg" in tensors:
                    adapter.optimizer.state[param] = {
                        "step": torch.tensor(float(steps.get(name, 0.0)), dtype=torch.float32, device=param.device),
                        "exp_avg": tensors[f"{name}.exp_avg"].to(self.device),
                        "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(self.device),
                    }
        self.adapters[adapter_id] = adapter
        return spec

    # -- forward / backward ----------------------------------------------------------------

    def prepare(self, call: ForwardBackwardCall) -> PreparedCall:
        """Check one call against its adapter, the model and its loss; raises UserError."""
        adapter = self.adapter(call.adapter_id)
        config = losses.validate_loss_request(call.loss_fn, call.config)
        self._validate_datums(call.datums, call.loss_fn, config)
        return PreparedCall(adapter, call.datums, call.loss_fn, config)

    def _check_tokens(self, tokens: np.ndarray, what: str) -> None:
        vocab = self.cfg.vocab_size
        if tokens.size == 0:
            raise UserError(f"{what} is empty")
        if tokens.min() < 0 or tokens.max() >= vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= vocab)][0])
            raise UserError(f"{what} contains token id {bad}, outside the vocabulary [0, {vocab})")

    def _validate_datums(self, datums: list[Datum], loss_fn: str, config: dict) -> None:
        if not datums:
            raise UserError("forward_backward needs at least one datum")
        context = self.cfg.max_context
        for i, datum in enumerate(datums):
            n = len(datum.tokens)
            self._check_tokens(np.asarray(datum.tokens), f"datum {i} model_input")
            if n > context:
                raise UserError(f"datum {i} has {n} tokens, more than the model's context length {context}")
            targets = datum.inputs.get("target_tokens")
            if targets is None:
                raise UserError(f"datum {i} has no loss_fn_inputs['target_tokens']")
            if targets.size and (targets.min() < 0 or targets.max() >= self.cfg.vocab_size):
                raise UserError(f"datum {i} target_tokens contains an id outside the vocabulary [0, {self.cfg.vocab_size})")
            try:
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in datum.inputs.items()}
                # A custom loss checks each datum against its own declared inputs (its config).
                losses.validate_datum_inputs(loss_fn, tensors, n, config if loss_fn == losses.CUSTOM else None)
                if datum.stability is not None and "advantages" in tensors:
                    losses.validate_stability_info(tensors["advantages"], _stability(datum))
            except losses.LossInputError as exc:
                raise UserError(f"datum {i}: {exc}") from None

    def forward_backward(self, calls: list[PreparedCall], forward_only: bool) -> list[TrainResult]:
        """Prepared calls, possibly of different adapters, in shared passes of at most
        `train_pass_tokens` padded tokens (a longer datum has a pass of its own); the first
        call's failure, if any, is raised."""
        passes = self.forward_backward_passes(calls, forward_only)
        while True:
            try:
                next(passes)
            except StopIteration as done:
                results = done.value
                break
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def forward_backward_passes(
        self, calls: list[PreparedCall], forward_only: bool, pass_tokens: Callable[[], int] | None = None,
    ) -> Generator[None, None, list[TrainResult | BaseException]]:
        """`forward_backward`, one pass per step: it yields after each pass (so the scheduler
        can run decode steps between the passes of a large batch) and returns each call's
        result, or the error that failed that call alone. `pass_tokens`, asked before each
        pass, caps that pass's padded tokens (default: `train_pass_tokens`); the scheduler
        makes passes smaller while sampling is going on.

        A loss that fails on a datum's values (a custom loss can: its dry run at validation
        sees zero logprobs, not the real ones) fails its own call only. The call's rows leave
        the batch, none of its loss reaches the backward pass, and its adapter's gradients
        are put back as they were before the call, so a retry does not count them twice.
        The other calls of the batch, other users' included, go on as if it had not been
        there. (Calls of one batch are of different adapters: the scheduler sees to that.)"""
        self.stats["forward_backward_calls"] += len(calls)
        flat = [(c, d) for c, call in enumerate(calls) for d in call.datums]
        outputs: list[list[dict[str, np.ndarray]]] = [[] for _ in calls]
        metrics: list[list[dict[str, float]]] = [[] for _ in calls]
        failed: dict[int, BaseException] = {}
        # Built-in losses are checked whole at validation; a custom one may still fail on values.
        # Keeping the gradients costs nothing in the usual loop (none between optim_step and the
        # next forward_backward) and one copy of the LoRA gradients when a run accumulates.
        saved_gradients = {c: _gradients(call.adapter) for c, call in enumerate(calls)
                           if call.loss_fn == losses.CUSTOM and not forward_only}
        start = 0
        while start < len(flat):
            budget = pass_tokens() if pass_tokens is not None else self.train_pass_tokens
            end = group_end(flat, start, budget, key=lambda item: len(item[1].tokens))
            newly_failed = self._pass(calls, flat[start:end], forward_only, outputs, metrics)
            start = end
            if newly_failed:
                failed.update(newly_failed)
                for c in newly_failed:
                    if c in saved_gradients:
                        _restore_gradients(calls[c].adapter, saved_gradients[c])
                flat = flat[:start] + [item for item in flat[start:] if item[0] not in failed]
            if start < len(flat):
                yield
        return [failed[c] if c in failed else TrainResult(outputs=o, metrics=losses.reduce_metrics(m))
                for c, (o, m) in enumerate(zip(outputs, metrics, strict=True))]

    def _pass(
        self,
        calls: list[PreparedCall],
        group: list[tuple[int, Datum]],
        forward_only: bool,
        outputs: list[list[dict[str, np.ndarray]]],
        metrics: list[list[dict[str, float]]],
    ) -> dict[int, BaseException]:
        """One shared pass over `group`; returns the calls whose loss failed in it (their loss
        is left out of the backward pass)."""
        lengths = [len(d.tokens) for _, d in group]
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for i, (_, d) in enumerate(group):
            tokens[i, : lengths[i]] = torch.from_numpy(d.tokens.astype(np.int64))
        tokens = tokens.to(self.device)
        segments: list[AdapterSegment] = []
        for i, (c, _) in enumerate(group):  # rows of one call are contiguous in `group`
            if segments and segments[-1].adapter is calls[c].adapter.weights:
                segments[-1].end = i + 1
            else:
                segments.append(AdapterSegment(i, i + 1, calls[c].adapter.weights))
        self.stats["forward_backward_passes"] += 1
        with torch.set_grad_enabled(not forward_only):
            batch = AdapterBatch(segments)
            hidden = self.model.hidden_states(tokens, batch)
            logits = self.model.logits(hidden, batch)
            # Every datum's target logprobs from one log-softmax and one gather over the whole
            # batch: slicing the [B, T, V] logits per datum would make each slice's backward
            # allocate and zero a tensor of the full logits' size. (log_softmax's fused
            # backward is one pass; logsumexp's is three over the full logits.)
            targets = [torch.from_numpy(np.ascontiguousarray(d.inputs["target_tokens"])).long() for _, d in group]
            flat = [t.reshape(t.shape[0], -1) for t in targets]  # [N] or [N, K] → [N, K]
            padded = torch.zeros(len(group), logits.shape[1], max(t.shape[1] for t in flat), dtype=torch.long)
            for i, t in enumerate(flat):
                padded[i, : t.shape[0], : t.shape[1]] = t
            picked = torch.log_softmax(logits, dim=-1).gather(-1, padded.to(self.device))
            call_losses: dict[int, list[torch.Tensor]] = {}
            failed: dict[int, BaseException] = {}
            for i, (c, d) in enumerate(group):
                if c in failed:
                    continue
                call = calls[c]
                inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in d.inputs.items()}
                target_lp = picked[i, : flat[i].shape[0], : flat[i].shape[1]].reshape(targets[i].shape)
                stability = _stability(d, self.device) if d.stability is not None else None
                try:
                    result = losses.compute_datum_loss(call.loss_fn, target_lp, inputs, call.config, stability)
                except Exception as exc:  # noqa: BLE001 - this call alone fails (forward_backward_passes)
                    failed[c] = exc
                    continue
                call_losses.setdefault(c, []).append(result.loss)
                out = {"logprobs": target_lp.detach().float().cpu().numpy()}
                out.update({k: v.detach().float().cpu().numpy() for k, v in result.extra_outputs.items()})
                outputs[c].append(out)
                metrics[c].append(result.metrics)
            surviving = [loss for c, terms in call_losses.items() if c not in failed for loss in terms]
            total = sum(surviving[1:], surviving[0]) if surviving else None
            if not forward_only and total is not None and total.requires_grad:
                total.backward()
        return failed

    # -- optimizer -------------------------------------------------------------------------

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        adapter = self.adapter(adapter_id)
        for name, value in (("learning_rate", params.learning_rate), ("eps", params.eps)):
            if not np.isfinite(value) or value < 0:
                raise UserError(f"adam_params.{name} must be a finite non-negative number, got {value}")
        for group in adapter.optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        grads = [p.grad for p in adapter.params.values() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else None  # one foreach pass over every gradient
        grad_norm = float(total_norm) if total_norm is not None else 0.0
        if params.grad_clip_norm > 0 and total_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(list(adapter.params.values()), params.grad_clip_norm, total_norm)
        with torch.enable_grad():
            adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": grad_norm}


def _gradients(adapter: TrainableAdapter) -> dict[str, torch.Tensor | None]:
    """A copy of the adapter's accumulated gradients (None where it has none)."""
    return {name: None if p.grad is None else p.grad.clone() for name, p in adapter.params.items()}


def _restore_gradients(adapter: TrainableAdapter, saved: dict[str, torch.Tensor | None]) -> None:
    for name, p in adapter.params.items():
        p.grad = saved[name]


def _stability(datum: Datum, device: torch.device | None = None) -> losses.StabilityInfo:
    sampler_lp, mask = datum.stability  # type: ignore[misc]
    return losses.StabilityInfo(
        sampler_logprobs=torch.from_numpy(sampler_lp).to(device or "cpu"),
        sampled_mask=torch.from_numpy(mask).to(device or "cpu"),
    )


def group_end(items: list, start: int, budget: int, key: Callable[[Any], int]) -> int:
    """Where the group that begins at `start` ends: as many consecutive items as keep its
    padded size (rows × longest) within `budget`, and at least one."""
    end, longest = start, 0
    while end < len(items):
        longest_next = max(longest, key(items[end]))
        if end > start and longest_next * (end - start + 1) > budget:
            break
        longest, end = longest_next, end + 1
    return end


def token_budget_groups(items: list, budget: int, key: Callable[[Any], int]) -> list[list]:
    """Consecutive groups whose padded size (rows × longest) stays within `budget`."""
    groups, start = [], 0
    while start < len(items):
        end = group_end(items, start, budget, key)
        groups.append(items[start:end])
        start = end
    return groups
