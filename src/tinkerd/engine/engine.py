"""The engine for one base model: training ops, sampling, and the scheduler loop.

Everything that touches tensors runs on one worker thread. Its loop interleaves the
two kinds of work:
  * queued jobs (create adapter, forward/backward, optimizer step, save, load) run one at
    a time, in submission order — the core layer submits each model's requests in
    `seq_id` order, so per-model order holds;
  * sampling is continuous batching: new requests are prefilled and join the running
    batch, every active sequence advances one token per decode step, finished ones leave.
A training job runs between two decode steps, so sampling continues while models train.

Callers get `concurrent.futures.Future`s; nothing here knows about HTTP or the SDK.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinkerd.engine import losses
from tinkerd.engine.cpu_kernels import CpuKernels
from tinkerd.engine.lora_io import read_checkpoint_dir, read_optimizer, write_checkpoint_dir
from tinkerd.engine.model import (
    AdapterBatch,
    AdapterSegment,
    GroupedLora,
    KVCache,
    LlamaModel,
    LoraStacks,
    LoraWeights,
    init_lora,
    lora_module_paths,
)
from tinkerd.engine.sampling import choose_tokens, make_generator
from tinkerd.engine.types import (
    AdamParams,
    AdapterRef,
    Datum,
    ForwardBackwardCall,
    LoraSpec,
    SampledSequence,
    SampleRequest,
    SampleResult,
    TrainResult,
    UserInputError,
)

log = logging.getLogger(__name__)

TOKENS_PER_TRAIN_PASS = 4096  # caps activation memory of one forward/backward pass (or prefill)
# On CPU a training pass stays within this many padded tokens (more passes, the gradients
# summed): past ~1k tokens the activations and [tokens, vocab] logits outgrow the caches and
# tokens/s fell (2048 tokens in one pass: ~185 tok/s against ~250 in passes of 512, on 2 cores).
CPU_TOKENS_PER_TRAIN_PASS = 512
KV_LENGTH_STEP = 256  # the KV cache grows in length as rows need it, not by max_tokens up front
# An idle engine that receives a sample request waits until arrivals pause for ADMIT_QUIET_S
# (at most ADMIT_MAX_S) before its prefill: requests sent together (an RL batch, `n` OpenAI
# calls) arrive over tens of milliseconds while the server parses them, and one shared
# prefill beats a one-request prefill competing with that parsing for the CPU and the GIL.
ADMIT_QUIET_S = 0.015
ADMIT_MAX_S = 0.15


@dataclass
class TrainableAdapter:
    spec: LoraSpec
    weights: LoraWeights
    optimizer: torch.optim.AdamW
    params: dict[str, torch.nn.Parameter]


@dataclass
class _Job:
    fn: Callable[[], Any] | None
    future: Future
    adapter_id: str | None = None  # None: a barrier nothing is batched across
    call: ForwardBackwardCall | None = None


@dataclass
class _Row:
    request: _ActiveSample
    index: int
    generator: torch.Generator
    position: int  # where the next input token goes
    last_token: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_lps: list[list[float]] = field(default_factory=list)
    done: bool = False


@dataclass
class _ActiveSample:
    request: SampleRequest
    future: Future
    adapter: LoraWeights | None
    result: SampleResult
    remaining: int


class Engine:
    def __init__(self, name: str, model_dir: Path, device: str | None = None, sampler_cache_size: int = 64):
        self.name = name
        self.model_dir = model_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._stopped = False
        self._cv = threading.Condition()
        self.adapters: dict[str, TrainableAdapter] = {}
        self._sampler_cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._sampler_cache_size = sampler_cache_size
        self._lora_stacks: OrderedDict = OrderedDict()  # adapter set → stacked LoRA weights for mixed decode
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._new_samples: deque[tuple[SampleRequest, Future]] = deque()
        self.admit_quiet_s, self.admit_max_s = ADMIT_QUIET_S, ADMIT_MAX_S
        self.train_pass_tokens = CPU_TOKENS_PER_TRAIN_PASS if self.device.type == "cpu" else TOKENS_PER_TRAIN_PASS
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self.stats = {"forward_backward_calls": 0, "forward_backward_passes": 0, "decode_steps": 0, "prefill_passes": 0}
        # Every tensor operation of the engine, loading included, runs on its own thread. OpenMP
        # keeps a thread team per thread that has run a parallel region; once two teams exist
        # on a 2-core machine, libgomp counts more threads than cores and stops spin-waiting,
        # and every small parallel operation of a decode step paid a wake-up (5-8x slower).
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(loaded,), name=f"engine-{name}", daemon=True)
        self._thread.start()
        loaded.result()
        if self.device.type == "cpu":
            log.info("engine %s: fp32 on CPU, oneDNN prepacked weights %s, fused decode kernels %s", name,
                     "on" if self.packed else "off", "on" if self.fused_kernels else "off")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    @property
    def max_context(self) -> int:
        return self.cfg.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    # -- submission (any thread) -----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run fn on the engine thread. Untagged jobs are barriers: nothing is batched across them."""
        return self._enqueue(_Job(lambda: fn(*args, **kwargs), Future()))

    def submit_for(self, adapter_id: str, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn on the engine thread as a request of `adapter_id` (other adapters may batch past it)."""
        return self._enqueue(_Job(lambda: fn(*args), Future(), adapter_id=adapter_id))

    def submit_forward_backward(self, call: ForwardBackwardCall) -> Future:
        """A forward/backward that may share one pass with other adapters' queued calls."""
        return self._enqueue(_Job(None, Future(), adapter_id=call.adapter_id, call=call))

    def _enqueue(self, job: _Job) -> Future:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def sample(self, request: SampleRequest) -> Future:
        future: Future = Future()
        with self._cv:
            self._new_samples.append((request, future))
            self._cv.notify()
        return future

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- worker loop -----------------------------------------------------------------------

    def _load_model(self) -> None:
        self.model = LlamaModel.load(self.model_dir, self.device, self.dtype)
        self.packed = os.environ.get("TINKERD_CPU_PACKED", "1") != "0" and self.model.pack_for_cpu()
        self.fused_kernels = self.model.use_cpu_kernels()
        self.cfg = self.model.cfg

    def _loop(self, loaded: Future) -> None:
        torch.set_grad_enabled(False)
        try:
            self._load_model()
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        while True:
            with self._cv:
                while not (self._stopped or self._jobs or self._new_samples or self._rows):
                    self._cv.wait()
                if self._stopped:
                    return
                job = self._jobs.popleft() if self._jobs else None
                if job is None and not self._rows and self._new_samples:
                    self._await_arrivals()
                new_samples = list(self._new_samples)
                self._new_samples.clear()
            if job is not None and job.call is not None:
                self._run_forward_backward_jobs([job, *self._take_batchable(job)])
            elif job is not None and job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    if not isinstance(exc, (UserInputError, losses.LossInputError)):
                        log.exception("engine job failed")
                    job.future.set_exception(exc)
            if new_samples:
                with torch.inference_mode():
                    self._admit_all(new_samples)
            if self._rows:
                try:
                    with torch.inference_mode():
                        self._decode_step()
                except BaseException as exc:  # noqa: BLE001 - fail every active request, keep serving
                    log.exception("decode step failed")
                    for row in self._rows:
                        if not row.request.future.done():
                            row.request.future.set_exception(exc)
                    self._rows.clear()

    def _await_arrivals(self) -> None:
        """Hold (with `_cv` held by the caller) until sample arrivals pause; see ADMIT_QUIET_S."""
        deadline = time.monotonic() + self.admit_max_s
        while not self._stopped and not self._jobs:
            seen = len(self._new_samples)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(min(self.admit_quiet_s, left))
            if len(self._new_samples) == seen:
                return

    def _take_batchable(self, first: _Job) -> list[_Job]:
        """Queued forward/backward calls of other adapters that may run in `first`'s pass.

        A call joins only if nothing of its adapter is queued before it (each adapter's
        requests keep their order) and no untagged barrier job comes first.
        """
        taken: list[_Job] = []
        seen = {first.adapter_id}
        with self._cv:
            for job in list(self._jobs):
                if job.adapter_id is None:
                    break
                if job.adapter_id in seen:
                    continue
                seen.add(job.adapter_id)
                if job.call is not None and job.call.forward_only == first.call.forward_only:
                    taken.append(job)
            for job in taken:
                self._jobs.remove(job)
        return taken

    def _run_forward_backward_jobs(self, jobs: list[_Job]) -> None:
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            call = job.call
            try:
                adapter = self._adapter(call.adapter_id)
                try:
                    config = losses.validate_loss_request(call.loss_fn, call.config)
                except losses.LossInputError as exc:
                    raise UserInputError(str(exc)) from None
                self.validate_datums(call.datums, call.loss_fn)
                ready.append((job, adapter, config))
            except BaseException as exc:  # noqa: BLE001 - this call alone fails
                if not isinstance(exc, (UserInputError, losses.LossInputError)):
                    log.exception("forward_backward validation failed")
                job.future.set_exception(exc)
        if not ready:
            return
        try:
            results = self._forward_backward_many([(a, j.call.datums, j.call.loss_fn, c) for j, a, c in ready], ready[0][0].call.forward_only)
        except BaseException as exc:  # noqa: BLE001
            log.exception("forward_backward failed")
            for job, _, _ in ready:
                job.future.set_exception(exc)
            return
        for (job, _, _), result in zip(ready, results, strict=True):
            job.future.set_result(result)

    # -- validation ------------------------------------------------------------------------

    def check_tokens(self, tokens: list[int] | np.ndarray, what: str) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            raise UserInputError(f"{what} is empty")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise UserInputError(f"{what} contains token id {bad}, outside the vocabulary [0, {self.vocab_size})")

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
        optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        return TrainableAdapter(spec=spec, weights=weights, optimizer=optimizer, params=params)

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> None:
        if spec.rank < 1:
            raise UserInputError(f"lora rank must be >= 1, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise UserInputError("at least one of train_attn, train_mlp, train_unembed must be true")
        self.adapters[adapter_id] = self._new_trainable(spec)

    def drop_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def _adapter(self, adapter_id: str) -> TrainableAdapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise UserInputError(f"model {adapter_id!r} is not loaded") from None

    def save_adapter(
        self, adapter_id: str, directory: Path, with_optimizer: bool, sampler_key: str | None = None
    ) -> int:
        """Write the adapter (and optionally its optimizer) to `directory`; returns bytes written.

        With `sampler_key`, the snapshot also goes straight into the sampler cache so the
        first sample of a fresh checkpoint does not wait for a disk read.
        """
        adapter = self._adapter(adapter_id)
        spec = adapter.spec
        opt_tensors = opt_meta = None
        if with_optimizer:
            opt_tensors, opt_meta = self._optimizer_tensors(adapter)
        extra = {"train_attn": spec.train_attn, "train_mlp": spec.train_mlp, "train_unembed": spec.train_unembed, "seed": spec.seed}
        size = write_checkpoint_dir(directory, adapter.weights, spec.rank, spec.alpha, self.name, extra, opt_tensors, opt_meta)
        if sampler_key is not None:
            self._cache_put(sampler_key, self._snapshot(adapter.weights))
        return size

    @staticmethod
    def _snapshot(weights: LoraWeights) -> LoraWeights:
        return LoraWeights(
            a={k: v.detach().clone() for k, v in weights.a.items()},
            b={k: v.detach().clone() for k, v in weights.b.items()},
            scale=weights.scale,
        )

    def _optimizer_tensors(self, adapter: TrainableAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, str] = {}
        for name, param in adapter.params.items():
            state = adapter.optimizer.state.get(param)
            if not state:
                continue
            tensors[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            steps[name] = str(float(state["step"]))
        import json

        return tensors, {"steps": json.dumps(steps)}

    def load_adapter(self, adapter_id: str, directory: Path, with_optimizer: bool) -> LoraSpec:
        """Create (or replace) a trainable adapter from a checkpoint directory."""
        config, weights = read_checkpoint_dir(directory, self.device)
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
        unknown = set(paths) - set(self.cfg_paths_all())
        if unknown:
            raise UserInputError(f"checkpoint has LoRA weights for modules this model does not have: {sorted(unknown)[:3]}")
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
            loaded = read_optimizer(directory)
            if loaded is None:
                raise UserInputError(f"checkpoint {directory.name} has no optimizer state")
            tensors, meta = loaded
            import json

            steps = json.loads(meta.get("steps", "{}"))
            for name, param in adapter.params.items():
                if f"{name}.exp_avg" in tensors:
                    adapter.optimizer.state[param] = {
                        "step": torch.tensor(float(steps.get(name, 0.0))),
                        "exp_avg": tensors[f"{name}.exp_avg"].to(self.device),
                        "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(self.device),
                    }
        self.adapters[adapter_id] = adapter
        return spec

    def cfg_paths_all(self) -> list[str]:
        return lora_module_paths(self.cfg, True, True, True)

    def _cache_put(self, key: str, weights: LoraWeights) -> None:
        self._sampler_cache[key] = weights
        self._sampler_cache.move_to_end(key)
        while len(self._sampler_cache) > self._sampler_cache_size:
            self._sampler_cache.popitem(last=False)

    def _sampler_adapter(self, ref: AdapterRef | None) -> LoraWeights | None:
        if ref is None:
            return None
        cached = self._sampler_cache.get(ref.key)
        if cached is not None:
            self._sampler_cache.move_to_end(ref.key)
            return cached
        _, weights = read_checkpoint_dir(ref.directory, self.device)
        weights = LoraWeights(
            a={k: v.to(self.dtype) for k, v in weights.a.items()},
            b={k: v.to(self.dtype) for k, v in weights.b.items()},
            scale=weights.scale,
        )
        self._cache_put(ref.key, weights)
        return weights

    # -- training --------------------------------------------------------------------------

    def validate_datums(self, datums: list[Datum], loss_fn: str) -> None:
        if not datums:
            raise UserInputError("forward_backward needs at least one datum")
        for i, datum in enumerate(datums):
            n = len(datum.tokens)
            self.check_tokens(datum.tokens, f"datum {i} model_input")
            if n > self.max_context:
                raise UserInputError(f"datum {i} has {n} tokens, more than the model's context length {self.max_context}")
            targets = datum.inputs.get("target_tokens")
            if targets is None:
                raise UserInputError(f"datum {i} has no loss_fn_inputs['target_tokens']")
            if targets.size and (targets.min() < 0 or targets.max() >= self.vocab_size):
                raise UserInputError(f"datum {i} target_tokens contains an id outside the vocabulary [0, {self.vocab_size})")
            try:
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in datum.inputs.items()}
                losses.validate_datum_inputs(loss_fn, tensors, n)
                if datum.stability is not None and "advantages" in tensors:
                    losses.validate_stability_info(tensors["advantages"], _stability(datum))
            except losses.LossInputError as exc:
                raise UserInputError(f"datum {i}: {exc}") from None

    def forward_backward(
        self, adapter_id: str, datums: list[Datum], loss_fn: str, config: dict, forward_only: bool
    ) -> TrainResult:
        """One call, run directly on the calling (engine) thread."""
        adapter = self._adapter(adapter_id)
        try:
            config = losses.validate_loss_request(loss_fn, config)
        except losses.LossInputError as exc:
            raise UserInputError(str(exc)) from None
        self.validate_datums(datums, loss_fn)
        return self._forward_backward_many([(adapter, datums, loss_fn, config)], forward_only)[0]

    def _forward_backward_many(
        self, calls: list[tuple[TrainableAdapter, list[Datum], str, dict]], forward_only: bool
    ) -> list[TrainResult]:
        """Validated calls, possibly of different adapters, in shared passes of at most
        `train_pass_tokens` padded tokens (a longer datum has a pass of its own). Each
        adapter's LoRA sees only its own rows, so its gradient comes only from its own datums."""
        self.stats["forward_backward_calls"] += len(calls)
        flat = [(c, d) for c, (_, datums, _, _) in enumerate(calls) for d in datums]
        outputs: list[list[dict[str, np.ndarray]]] = [[] for _ in calls]
        metrics: list[list[dict[str, float]]] = [[] for _ in calls]
        for group in _token_budget_groups(flat, self.train_pass_tokens, key=lambda item: len(item[1].tokens)):
            self._forward_backward_pass(calls, group, forward_only, outputs, metrics)
        return [TrainResult(outputs=o, metrics=losses.reduce_metrics(m)) for o, m in zip(outputs, metrics, strict=True)]

    def _forward_backward_pass(
        self,
        calls: list[tuple[TrainableAdapter, list[Datum], str, dict]],
        group: list[tuple[int, Datum]],
        forward_only: bool,
        outputs: list[list[dict[str, np.ndarray]]],
        metrics: list[list[dict[str, float]]],
    ) -> None:
        lengths = [len(d.tokens) for _, d in group]
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for i, (_, d) in enumerate(group):
            tokens[i, : lengths[i]] = torch.from_numpy(d.tokens.astype(np.int64))
        tokens = tokens.to(self.device)
        segments: list[AdapterSegment] = []
        for i, (c, _) in enumerate(group):  # rows of one call are contiguous in `group`
            if segments and segments[-1].adapter is calls[c][0].weights:
                segments[-1].end = i + 1
            else:
                segments.append(AdapterSegment(i, i + 1, calls[c][0].weights))
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
            total = None
            for i, (c, d) in enumerate(group):
                _, _, loss_fn, config = calls[c]
                inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in d.inputs.items()}
                target_lp = picked[i, : flat[i].shape[0], : flat[i].shape[1]].reshape(targets[i].shape)
                stability = _stability(d, self.device) if d.stability is not None else None
                result = losses.compute_datum_loss(loss_fn, target_lp, inputs, config, stability)
                total = result.loss if total is None else total + result.loss
                out = {"logprobs": target_lp.detach().float().cpu().numpy()}
                out.update({k: v.detach().float().cpu().numpy() for k, v in result.extra_outputs.items()})
                outputs[c].append(out)
                metrics[c].append(result.metrics)
            if not forward_only and total is not None and total.requires_grad:
                total.backward()

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        adapter = self._adapter(adapter_id)
        for name, value in (("learning_rate", params.learning_rate), ("eps", params.eps)):
            if not np.isfinite(value) or value < 0:
                raise UserInputError(f"adam_params.{name} must be a finite non-negative number, got {value}")
        for group in adapter.optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        grads = [p.grad for p in adapter.params.values() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()) if grads else 0.0
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grad_norm_(list(adapter.params.values()), params.grad_clip_norm)
        with torch.enable_grad():
            adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": grad_norm}

    # -- sampling --------------------------------------------------------------------------

    def _admit_all(self, pending: list[tuple[SampleRequest, Future]]) -> None:
        """Prefill every newly arrived request, in shared passes, and add its rows to the batch."""
        ready: list[tuple[SampleRequest, Future, LoraWeights | None]] = []
        for request, future in pending:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                prompt = request.prompt
                self.check_tokens(prompt, "prompt")
                if len(prompt) >= self.max_context:
                    raise UserInputError(f"prompt has {len(prompt)} tokens; the model's context length is {self.max_context}")
                request.params.max_tokens = max(0, min(request.params.max_tokens, self.max_context - len(prompt)))
                ready.append((request, future, self._sampler_adapter(request.adapter)))
            except BaseException as exc:  # noqa: BLE001 - this request alone fails
                if not isinstance(exc, UserInputError):
                    log.exception("sample admission failed")
                future.set_exception(exc)
        # Requests of one adapter side by side: a prefill pass runs one LoRA product per run of
        # rows with the same adapter (requests alternating between 8 checkpoints made 32 runs).
        first_seen: dict[int, int] = {}
        ready.sort(key=lambda item: first_seen.setdefault(id(item[2]), len(first_seen)))
        for group in _token_budget_groups(ready, TOKENS_PER_TRAIN_PASS, key=lambda item: len(item[0].prompt)):
            try:
                self._prefill(group)
            except BaseException as exc:  # noqa: BLE001
                log.exception("prefill failed")
                for _, future, _ in group:
                    if not future.done():
                        future.set_exception(exc)

    def _prefill(self, group: list[tuple[SampleRequest, Future, LoraWeights | None]]) -> None:
        """One causal pass over right-padded prompts (row i uses request i's adapter)."""
        lengths = [len(request.prompt) for request, _, _ in group]
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for i, (request, _, _) in enumerate(group):
            tokens[i, : lengths[i]] = torch.tensor(request.prompt)
        tokens = tokens.to(self.device)
        segments: list[AdapterSegment] = []
        for i, (_, _, adapter) in enumerate(group):
            if segments and segments[-1].adapter is adapter:
                segments[-1].end = i + 1
            else:
                segments.append(AdapterSegment(i, i + 1, adapter))
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats["prefill_passes"] += 1
        batch = AdapterBatch(segments)
        hidden = self.model.hidden_states(tokens, batch, kv_out=kv)
        # Every prompt's last position in one unembedding: its logits give the first token.
        last_index = torch.tensor([n - 1 for n in lengths], device=self.device)
        last_hidden = hidden[torch.arange(len(group), device=self.device), last_index][:, None]
        last_logits = self.model.logits(last_hidden, batch)[:, 0]
        started: list[tuple[list[_Row], list, int, int]] = []
        row_sources: list[int] = []
        for i, (request, future, adapter) in enumerate(group):
            n = lengths[i]
            prompt_logits = None
            if request.prompt_logprobs or request.topk_prompt_logprobs > 0:
                prompt_logits = self.model.logits(hidden[i : i + 1, :n], AdapterBatch.single(adapter, 1))[0]
            rows = self._start_request(request, future, adapter, tokens[i, :n], prompt_logits)
            if rows:
                own_kv = [(k[i : i + 1, :, :n], v[i : i + 1, :, :n]) for k, v in kv]
                started.append((rows, own_kv, n, request.params.max_tokens))
                row_sources += [i] * len(rows)
        if not started:
            return
        # The first token of every sample of every request in one batched choice.
        self._accept_tokens([row for rows, *_ in started for row in rows], last_logits[torch.tensor(row_sources, device=self.device)])
        for rows, own_kv, n, max_tokens in started:
            live = [row for row in rows if not row.done]
            if live:
                self._place_rows(live, own_kv, n, max_tokens)

    def _start_request(
        self,
        request: SampleRequest,
        future: Future,
        adapter: LoraWeights | None,
        tokens: torch.Tensor,
        prompt_logits: torch.Tensor | None,
    ) -> list[_Row]:
        """A prefilled request's prompt scores (from `prompt_logits`, every position, when it
        asked for them) and its sample rows, which still need their first token."""
        prompt = request.prompt
        params = request.params
        result = SampleResult(sequences=[])
        if prompt_logits is not None:
            lsm = torch.log_softmax(prompt_logits[:-1], dim=-1)
            if request.prompt_logprobs:
                got = lsm.gather(-1, tokens[1:, None])[:, 0]
                result.prompt_logprobs = [float("nan")] + got.cpu().tolist()
                if request.prompt_logprobs_last_n is not None:
                    cut = max(0, len(prompt) - request.prompt_logprobs_last_n)
                    result.prompt_logprobs[:cut] = [float("nan")] * cut
            k = request.topk_prompt_logprobs
            if k > 0:
                top = torch.topk(lsm, k, dim=-1)
                result.topk_prompt_ids = [[0] * k] + top.indices.cpu().tolist()
                result.topk_prompt_logprobs = [[-99999.0] * k] + top.values.cpu().tolist()
        active = _ActiveSample(request, future, adapter, result, remaining=request.num_samples)
        result.sequences = [None] * request.num_samples  # type: ignore[list-item]
        if params.max_tokens == 0:
            for i in range(request.num_samples):
                result.sequences[i] = SampledSequence(tokens=[], logprobs=[], stop_reason="length")
            future.set_result(result)
            return []
        return [
            _Row(active, i, make_generator(params.seed, i, self.device), position=len(prompt), last_token=-1)
            for i in range(request.num_samples)
        ]

    def _place_rows(self, rows: list[_Row], kv: list, prompt_len: int, max_tokens: int) -> None:
        need_rows = len(self._rows) + len(rows)
        # max_tokens defaults to the rest of the context (8k for SmolLM2): reserving it all up front
        # cost GBs per request; _decode_step grows the length when a row reaches the end.
        need_len = prompt_len + min(max_tokens, KV_LENGTH_STEP) + 1
        if self._cache is None:
            self._cache = KVCache(self.cfg, max(8, need_rows), max(256, need_len), self.device, self.dtype)
        elif need_rows > self._cache.rows or need_len > self._cache.length:
            self._cache = self._cache.grown(
                max(need_rows, 2 * self._cache.rows if need_rows > self._cache.rows else 0),
                max(need_len, 2 * self._cache.length if need_len > self._cache.length else 0),
            )
        start = len(self._rows)
        for layer, (k, v) in enumerate(kv):
            self._cache.k[layer, start : start + len(rows), :, :prompt_len] = k[0]
            self._cache.v[layer, start : start + len(rows), :, :prompt_len] = v[0]
        self._rows.extend(rows)

    def _accept_tokens(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose the next token of every row from its logits [n, V] and check stop conditions.

        All tensor work is batched; one host transfer brings back every row's token and
        logprob. Randomness comes from each row's own generator, so a row's token depends
        only on its seed and its logits.
        """
        choice = choose_tokens(logits, [r.request.request.params for r in rows], [r.generator for r in rows])
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, choice[:, None])[:, 0]
        k = max(r.request.request.topk_sample_logprobs for r in rows)
        top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
        tokens = choice.tolist()
        token_lps = picked.tolist()
        top_ids = top.indices.tolist() if top is not None else None
        top_lps = top.values.tolist() if top is not None else None
        for i, row in enumerate(rows):
            req = row.request.request
            params = req.params
            token = tokens[i]
            row.tokens.append(token)
            row.logprobs.append(token_lps[i])
            if req.topk_sample_logprobs > 0:
                row.topk_ids.append(top_ids[i][: req.topk_sample_logprobs])
                row.topk_lps.append(top_lps[i][: req.topk_sample_logprobs])
                if req.on_token_topk is not None:
                    req.on_token_topk(row.index, row.topk_ids[-1], row.topk_lps[-1])
            if req.on_token is not None:
                req.on_token(row.index, token, row.logprobs[-1])
            row.last_token = token
            stop = (not params.ignore_eos and token in self.cfg.eos_token_ids) or token in params.stop_token_ids
            if not stop and params.stop_strings:
                text = self.tokenizer.decode(row.tokens[-64:], skip_special_tokens=False)
                stop = any(s in text for s in params.stop_strings)
            if not stop and req.is_cancelled is not None:
                stop = req.is_cancelled(row.index)
            if stop or len(row.tokens) >= params.max_tokens:
                self._finish_row(row, "stop" if stop else "length")

    def _finish_row(self, row: _Row, reason: str) -> None:
        row.done = True
        active = row.request
        active.result.sequences[row.index] = SampledSequence(
            tokens=row.tokens,
            logprobs=row.logprobs,
            stop_reason=reason,
            topk_ids=row.topk_ids or None,
            topk_logprobs=row.topk_lps or None,
        )
        active.remaining -= 1
        if active.remaining == 0 and not active.future.done():
            active.future.set_result(active.result)

    def _decode_step(self) -> None:
        self.stats["decode_steps"] += 1
        rows = self._rows
        n = len(rows)
        need_len = max(r.position for r in rows) + 1
        if self._cache is not None and need_len > self._cache.length:
            self._cache = self._cache.grown(self._cache.rows, max(need_len, min(2 * self._cache.length, self.max_context + 1)))
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        batch = _row_adapter_batch([r.request.adapter for r in rows], self.device, self._lora_stacks, self.model.kernels)
        hidden = self.model.hidden_states(tokens, batch, positions=positions, cache=self._cache)
        logits = self.model.logits(hidden, batch, decoding=True)[:, 0]
        for row in rows:
            row.position += 1
        self._accept_tokens(rows, logits)
        # Compact: keep active rows at 0..m-1 by moving the last live row into each hole.
        cache = self._cache
        keep = [r for r in rows if not r.done]
        if len(keep) != n:
            slots = list(range(n))
            live = [i for i in slots if not rows[i].done]
            new_rows: list[_Row] = [rows[i] for i in live]
            for dst, src in enumerate(live):
                if dst != src:
                    cache.move_row(src, dst)
            self._rows = new_rows


def _row_adapter_batch(
    adapters: list[LoraWeights | None], device: torch.device, stack_cache: OrderedDict,
    kernels: CpuKernels | None = None,
) -> AdapterBatch:
    """Decode rows by adapter: the base alone → plain; otherwise grouped batched LoRA (with
    cached stacks, q/k/v and gate/up updates fused), even when every row has one adapter."""
    if all(a is None for a in adapters):
        return AdapterBatch.single(None, len(adapters))
    # The set of adapters, in a fixed order whatever the rows' order: rows arriving in another
    # order (or a row leaving and joining) must find the stacks already built, not copy them again.
    distinct = sorted({id(a): a for a in adapters}.values(), key=id)
    order = {id(a): g for g, a in enumerate(distinct)}
    key = tuple(order)
    stacks = stack_cache.get(key)
    if stacks is None:
        stacks = stack_cache[key] = LoraStacks(tuple(distinct))
        while len(stack_cache) > 4:
            stack_cache.popitem(last=False)
    stack_cache.move_to_end(key)
    grouped = GroupedLora.build(stacks, [order[id(a)] for a in adapters], device, kernels)
    return AdapterBatch([AdapterSegment(0, len(adapters), None)], grouped=grouped)


def _stability(datum: Datum, device: torch.device | None = None) -> losses.StabilityInfo:
    sampler_lp, mask = datum.stability  # type: ignore[misc]
    return losses.StabilityInfo(
        sampler_logprobs=torch.from_numpy(sampler_lp).to(device or "cpu"),
        sampled_mask=torch.from_numpy(mask).to(device or "cpu"),
    )


def _token_budget_groups(items: list, budget: int, key: Callable[[Any], int]) -> list[list]:
    """Consecutive groups whose padded size (rows × longest) stays within `budget`."""
    groups: list[list] = [[]]
    longest = 0
    for item in items:
        longest_next = max(longest, key(item))
        if groups[-1] and longest_next * (len(groups[-1]) + 1) > budget:
            groups.append([])
            longest_next = key(item)
        groups[-1].append(item)
        longest = longest_next
    return [g for g in groups if g]





def now() -> float:
    return time.time()
