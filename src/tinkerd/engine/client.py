"""The one door into an engine: `EngineClient`.

Everything above `engine/` (the core, and through it both front doors) reaches the engine
of a base model through this interface, and nothing else. What crosses it is plain and
picklable (`tinkerd.types`): token lists, floats, numpy arrays, loss names, adapter ids and
checkpoint directories in; `concurrent.futures.Future`s of plain results out. No tensor,
model object or engine setting crosses it, so a remote engine (a Ray actor) implements the
same methods by forwarding the same values.

Two arguments are local to the caller's side by design: `sample`'s `on_token` sink (a
remote implementation feeds it from the tokens it receives) and the futures themselves.

`InProcessEngine` is the implementation that runs the engine in this process, on its own
thread (`scheduler.py`).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tinkerd.types import AdamParams, AdapterRef, EngineStats, ForwardBackwardCall, LoraSpec, ModelInfo, SampleRequest, TokenEvent

log = logging.getLogger(__name__)


class EngineClient(ABC):
    """One base model's engine. Requests of one adapter run in the order they are made."""

    info: ModelInfo

    @abstractmethod
    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> Future:
        """A fresh trainable LoRA adapter (and its AdamW state). Future[None]."""

    @abstractmethod
    def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> Future:
        """A trainable adapter from a checkpoint directory (replacing one of that id). Future[LoraSpec]."""

    @abstractmethod
    def drop_adapter(self, adapter_id: str) -> Future:
        """Free an adapter's weights and optimizer state. Future[None]."""

    @abstractmethod
    def forward_backward(self, call: ForwardBackwardCall) -> Future:
        """Forward (and backward, unless `call.forward_only`) of one adapter's datums. Future[TrainResult]."""

    @abstractmethod
    def optim_step(self, adapter_id: str, params: AdamParams) -> Future:
        """One AdamW step on the accumulated gradients. Future[dict of metrics]."""

    @abstractmethod
    def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool, sampler_key: str | None = None) -> Future:
        """Write the adapter as a PEFT checkpoint directory (atomically). With `sampler_key`, the
        saved weights also serve samples of that key at once. Future[int: bytes written]."""

    @abstractmethod
    def publish_inflight(self, adapter_id: str, ref: AdapterRef) -> Future:
        """The adapter's current weights become the in-flight weights `ref` names (its
        `inflight_of` is `adapter_id`): a copy in the engine's memory, taken in order with the
        adapter's other requests, that samples of any version up to `ref.version` run on from
        now on (nothing is written to disk). Dropping the adapter drops them. Future[None]."""

    @abstractmethod
    def sample(self, request: SampleRequest, on_token: Callable[[TokenEvent], None] | None = None) -> Future:
        """Sample a checked request (`core/sampling.py`). `on_token` streams each token as it is
        chosen. Future[SampleResult]."""

    @abstractmethod
    def cancel(self, request_id: str, sample_index: int | None = None) -> None:
        """End a running sample request early (one sample, or all of them): the cancelled
        samples finish with stop_reason "stop" and the tokens they have."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine; requests still queued never complete."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of what the engine is and does (gauges) and has done (counters,
        latency histograms), taken without waiting for the engine thread."""


class InProcessEngine(EngineClient):
    """The engine of one base model, in this process, on its own thread."""

    def __init__(self, name: str, model_dir: Path, device: str | None = None, sampler_cache_size: int = 64,
                 kv_cache_bytes: int | None = None, prefix_cache_bytes: int | None = None):
        """`kv_cache_bytes`: the sampler's KV cache budget (default: half the free GPU memory
        after loading, or a quarter of the machine's RAM). `prefix_cache_bytes`: memory for
        prompt K/V kept across requests (0: none; default: 1/8 of the KV cache budget)."""
        from tinkerd.engine.meter import EngineMeter
        from tinkerd.engine.sampler import Cancellations

        self.name = name
        self.model_dir = Path(model_dir)
        self._device = device
        self._sampler_cache_size = sampler_cache_size
        self._kv_cache_bytes = kv_cache_bytes
        self._prefix_cache_bytes = prefix_cache_bytes
        self.cancellations = Cancellations()
        self.meter = EngineMeter()  # counters and latencies, read by stats()
        from tinkerd.engine.scheduler import Scheduler

        self.scheduler = Scheduler(name, self._build)
        self.trainer = self.scheduler.trainer
        self.sampler = self.scheduler.sampler
        self.model = self.trainer.model
        cfg = self.model.cfg
        self.info = ModelInfo(name=name, model_dir=str(self.model_dir), max_context=cfg.max_context,
                              vocab_size=cfg.vocab_size, eos_token_ids=tuple(cfg.eos_token_ids))

    def _build(self) -> tuple[Any, Any]:
        """On the engine thread: load the model, then the trainer and sampler around it."""
        import torch
        from transformers import AutoTokenizer

        from tinkerd.engine.sampler import AdapterCache, Sampler
        from tinkerd.engine.trainer import Trainer

        device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = self._load_model(device, dtype)
        packed = os.environ.get("TINKERD_CPU_PACKED", "1") != "0" and model.pack_for_cpu()
        fused_kernels = model.use_cpu_kernels()
        if device.type == "cpu":
            cfg = model.cfg
            log.info("engine %s: %s, fp32 on CPU, oneDNN prepacked weights %s, fused decode kernels %s%s%s", self.name,
                     cfg.architecture, "on" if packed else "off", "on" if fused_kernels else "off",
                     " (q/k head norms in torch before the attention kernel)" if fused_kernels and cfg.qk_norm else "",
                     "; experts in torch, grouped by expert" if cfg.moe else "")
        adapters = AdapterCache(self._sampler_cache_size, device, dtype, self.meter)
        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return Trainer(model, self.name, adapters.put), Sampler(model, tokenizer, adapters, self.cancellations, self._kv_cache_bytes,
                                                                self._prefix_cache_bytes)

    def _load_model(self, device: Any, dtype: Any) -> Any:
        """The model of `model_dir` (a benchmark's engine may build one another way)."""
        from tinkerd.engine.model import LlamaModel

        return LlamaModel.load(self.model_dir, device, dtype)

    # -- the door --------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> Future:
        return self.scheduler.submit(self.trainer.create_adapter, adapter_id, spec)

    def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> Future:
        return self.scheduler.submit_for(adapter_id, self.trainer.load_adapter, adapter_id, directory, with_optimizer)

    def drop_adapter(self, adapter_id: str) -> Future:
        return self.scheduler.submit(self._drop_adapter, adapter_id)

    def _drop_adapter(self, adapter_id: str) -> None:
        self.trainer.drop_adapter(adapter_id)
        self.sampler.adapters.drop_inflight(adapter_id)

    def forward_backward(self, call: ForwardBackwardCall) -> Future:
        return self.scheduler.submit_forward_backward(call)

    def optim_step(self, adapter_id: str, params: AdamParams) -> Future:
        return self.scheduler.submit_for(adapter_id, self.meter.timing("optim_step", self.trainer.optim_step), adapter_id, params)

    def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool, sampler_key: str | None = None) -> Future:
        return self.scheduler.submit_for(adapter_id, self.trainer.save_adapter, adapter_id, directory, with_optimizer, sampler_key)

    def publish_inflight(self, adapter_id: str, ref: AdapterRef) -> Future:
        return self.scheduler.submit_for(adapter_id, self._publish_inflight, adapter_id, ref)

    def _publish_inflight(self, adapter_id: str, ref: AdapterRef) -> None:
        if ref.inflight_of != adapter_id:
            raise ValueError(f"in-flight weights {ref.key} are not {adapter_id}'s")
        self.sampler.adapters.publish_inflight(ref, self.trainer.sampler_copy(adapter_id))

    def sample(self, request: SampleRequest, on_token: Callable[[TokenEvent], None] | None = None) -> Future:
        from tinkerd.engine.sampler import PendingSample

        self.cancellations.track(request.request_id)
        return self.scheduler.submit_sample(PendingSample(request, Future(), on_token))

    def cancel(self, request_id: str, sample_index: int | None = None) -> None:
        self.cancellations.cancel(request_id, sample_index)

    def shutdown(self) -> None:
        self.scheduler.shutdown()

    def stats(self) -> EngineStats:
        import resource

        import torch

        device = self.model.device
        if device.type == "cuda":
            memory = torch.cuda.memory_allocated(device)
        else:
            try:  # resident set size, in pages
                memory = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
            except (OSError, ValueError, IndexError):
                memory = 0
        return EngineStats(
            device=str(device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            queued_jobs=self.scheduler.queued_jobs(),
            samples_waiting=self.scheduler.queued_samples(),
            sample_rows_running=len(self.sampler.rows),
            adapters_trainable=len(self.trainer.adapters),
            adapters_cached=len(self.sampler.adapters),
            memory_bytes=memory,
            counters=dict(self.meter.counters),
            latencies=self.meter.latencies(),
        )

    # -- in this process only --------------------------------------------------------------

    def run_on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) on the engine thread, as a barrier. For work that must share the engine's
        one OpenMP team in this process (the benchmarks' in-process baselines)."""
        return self.scheduler.submit(fn, *args)
