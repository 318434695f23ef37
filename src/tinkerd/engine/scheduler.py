"""The engine thread of one base model: what runs, and when.

One thread runs every tensor operation of the engine, model loading included. OpenMP
keeps a thread team per thread that has run a parallel region; once two teams exist on a
2-core machine, libgomp counts more threads than cores and stops spin-waiting, and every
small parallel operation of a decode step paid a wake-up (5-8x slower).

Its loop interleaves two kinds of work (docs/engine.md):
  * queued jobs run one at a time. Each adapter's jobs run in submission order (the core
    submits each model's requests in `seq_id` order); adapters with queued jobs take turns,
    the one served longest ago first, so one run's long queue does not keep another run's
    request behind all of it. Untagged jobs are barriers: nothing passes them, and they
    pass nothing. A forward/backward call takes the queued calls of other adapters (of the
    same kind, none of whose adapter's requests are queued before it) into one shared pass;
  * sampling is continuous batching: new requests are prefilled and join the running
    batch, every active row advances one token per decode step, finished ones leave.
A forward/backward runs one pass (at most the trainer's `train_pass_tokens`, a quarter of
that while sampling goes on) at a time; while sample rows are decoding, the passes and the
decode steps share the engine's time about equally, so neither a large training batch nor a
sampling flood stalls the other.

This module decides; the trainer and the sampler do the math.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tinkerd.engine.sampler import PendingSample, Sampler
from tinkerd.engine.trainer import Trainer
from tinkerd.types import ForwardBackwardCall, TrainResult, UserError, mark_started

log = logging.getLogger(__name__)

# An idle engine that receives a sample request waits until arrivals pause for ADMIT_QUIET_S
# (at most ADMIT_MAX_S) before its prefill: requests sent together (an RL batch, `n` OpenAI
# calls) arrive over tens of milliseconds while the server parses them, and one shared
# prefill beats a one-request prefill competing with that parsing for the CPU and the GIL.
ADMIT_QUIET_S = 0.015
ADMIT_MAX_S = 0.15

# While sampling is going on (rows decoding, requests waiting, or one served within
# SAMPLING_RECENT_S), a training pass takes 1/SHARED_PASS_DIVISOR of its usual tokens: a
# request that arrives during a pass waits for at most that much of it. Smaller passes cost
# the training some throughput, only while someone samples.
SAMPLING_RECENT_S = 1.0
SHARED_PASS_DIVISOR = 4


@dataclass
class _Job:
    fn: Callable[[], Any] | None
    future: Future
    adapter_id: str | None = None  # None: a barrier nothing is batched across
    call: ForwardBackwardCall | None = None


@dataclass
class _Training:
    """A forward/backward in progress: its jobs and the passes still to run."""

    jobs: list[_Job]
    passes: Generator[None, None, list[TrainResult]]
    started: float
    train_tokens: int


class Scheduler:
    """Owns the engine thread. `build` runs first on it and returns the trainer and sampler."""

    def __init__(self, name: str, build: Callable[[], tuple[Trainer, Sampler]]):
        self.name = name
        self._stopped = False
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._new_samples: deque[PendingSample] = deque()
        self._served: dict[str, int] = {}  # adapter -> when its last job was taken (a tick)
        self._ticks = 0
        self._training: _Training | None = None
        # Seconds of decoding owed to sample rows for the training passes run while they
        # waited: a pass runs only when nothing is owed (or no row is decoding).
        self._decode_owed = 0.0
        self._last_pass_s = 0.0  # how long the latest training pass took
        self._window_given = False  # whether arrivals since that pass got their decode window
        self._sampled_at = -float("inf")  # time.monotonic() when sample rows last decoded
        self.admit_quiet_s, self.admit_max_s = ADMIT_QUIET_S, ADMIT_MAX_S
        self.trainer: Trainer
        self.sampler: Sampler
        built: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(build, built), name=f"engine-{name}", daemon=True)
        self._thread.start()
        built.result()

    # -- submission (any thread) -----------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn on the engine thread as a barrier: nothing is batched across it."""
        return self._enqueue(_Job(lambda: fn(*args), Future()))

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

    def submit_sample(self, pending: PendingSample) -> Future:
        with self._cv:
            self._new_samples.append(pending)
            self._cv.notify()
        return pending.future

    def queued_jobs(self) -> int:
        """Training and checkpoint jobs waiting for the engine thread."""
        return len(self._jobs)

    def queued_samples(self) -> int:
        """Sample requests not yet admitted into the decoding batch."""
        return len(self._new_samples)

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the loop (engine thread) ----------------------------------------------------------

    def _loop(self, build: Callable[[], tuple[Trainer, Sampler]], built: Future) -> None:
        torch.set_grad_enabled(False)
        try:
            self.trainer, self.sampler = build()
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor
            built.set_exception(exc)
            return
        built.set_result(None)
        sampler = self.sampler
        while True:
            with self._cv:
                while not (self._stopped or self._jobs or self._new_samples or sampler.rows or self._training):
                    self._cv.wait()
                if self._stopped:
                    return
                job = self._next_job() if self._training is None else None
                if job is None and self._training is None and not sampler.rows and self._new_samples:
                    self._await_arrivals()
                new_samples = list(self._new_samples)
                self._new_samples.clear()
            if self._training is not None:
                if new_samples:  # before the next pass, so they decode first (_admit)
                    self._admit(new_samples)
                    new_samples = []
                if not sampler.rows or self._decode_owed <= 0:
                    self._training_pass()
            elif job is not None and job.call is not None:
                self._start_forward_backward([job, *self._take_batchable(job)])
            elif job is not None and job.future.set_running_or_notify_cancel():
                mark_started(job.future)
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    if not isinstance(exc, UserError):
                        log.exception("engine job failed")
                    job.future.set_exception(exc)
            if new_samples:
                self._admit(new_samples)
            if sampler.rows:
                started = time.perf_counter()
                try:
                    with torch.inference_mode(), sampler.meter.timed("decode_step"):
                        sampler.decode_step()
                    sampler.meter.count("decode_steps")
                except BaseException as exc:  # noqa: BLE001 - fail every active request, keep serving
                    log.exception("decode step failed")
                    sampler.fail_all(exc)
                self._decode_owed -= time.perf_counter() - started
                self._sampled_at = time.monotonic()
            if self._training is None or not sampler.rows:
                self._decode_owed = 0.0

    def _admit(self, new_samples: list[PendingSample]) -> None:
        sampler = self.sampler
        started = time.monotonic()
        for item in new_samples:  # their prefill begins (those past the KV budget: again when next admitted)
            mark_started(item.future, started)
        try:
            with torch.inference_mode():
                waiting = sampler.admit(new_samples)
            if waiting:  # past the KV budget: first in line again once rows finish
                with self._cv:
                    self._new_samples.extendleft(reversed(waiting))
        except BaseException as exc:  # noqa: BLE001 - admission fails each request alone; this is a last resort
            log.exception("admitting samples failed")
            for item in new_samples:
                if not item.future.done():
                    item.future.set_exception(exc)
        if self._training is not None and not self._window_given:
            # Arrivals during a large batch decode for as long as a pass takes before the next
            # pass, so a short request finishes without waiting for it; once per pass, so a
            # steady stream of arrivals cannot hold the training back.
            self._decode_owed = max(self._decode_owed, self._last_pass_s)
            self._window_given = True

    def _next_job(self) -> _Job | None:
        """(With `_cv` held.) The next job to run: a barrier at the head of the queue, else
        the first queued job of the adapter served longest ago, among the jobs before the
        first barrier."""
        if not self._jobs:
            return None
        head = self._jobs[0]
        if head.adapter_id is None:
            return self._jobs.popleft()
        firsts: dict[str, _Job] = {}
        for job in self._jobs:
            if job.adapter_id is None:
                break
            firsts.setdefault(job.adapter_id, job)
        chosen = min(firsts.values(), key=lambda job: self._served.get(job.adapter_id, -1))
        self._jobs.remove(chosen)
        self._ticks += 1
        self._served[chosen.adapter_id] = self._ticks
        if len(self._served) > 4 * len(firsts) + 1024:  # forget adapters long gone
            self._served = {a: t for a, t in self._served.items() if a in firsts}
        return chosen

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

    def _start_forward_backward(self, jobs: list[_Job]) -> None:
        """Each call is checked alone (a bad one fails alone); the rest share passes, run
        one at a time by `_training_pass`."""
        ready = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            mark_started(job.future)
            try:
                ready.append((job, self.trainer.prepare(job.call)))
            except BaseException as exc:  # noqa: BLE001 - this call alone fails
                if not isinstance(exc, UserError):
                    log.exception("forward_backward validation failed")
                job.future.set_exception(exc)
        if not ready:
            return
        passes = self.trainer.forward_backward_passes([prepared for _, prepared in ready], ready[0][0].call.forward_only,
                                                      self._pass_tokens)
        tokens = sum(len(datum.tokens) for job, _ in ready for datum in job.call.datums)
        self._training = _Training([job for job, _ in ready], passes, time.perf_counter(), tokens)
        self._training_pass()

    def _pass_tokens(self) -> int:
        """The padded tokens of the next training pass (SAMPLING_RECENT_S)."""
        full = self.trainer.train_pass_tokens
        sampling = self.sampler.rows or self._new_samples or time.monotonic() - self._sampled_at < SAMPLING_RECENT_S
        return max(1, full // SHARED_PASS_DIVISOR) if sampling else full

    def _training_pass(self) -> None:
        """Run the next pass of the forward/backward in progress; deliver its results after the last."""
        training = self._training
        assert training is not None
        started = time.perf_counter()
        try:
            next(training.passes)
        except StopIteration as done:
            self._training = None
            meter = self.sampler.meter
            meter.observe("forward_backward", time.perf_counter() - training.started)
            meter.count("train_tokens", training.train_tokens)
            for job, result in zip(training.jobs, done.value, strict=True):
                if isinstance(result, BaseException):  # this call alone failed (Trainer.forward_backward_passes)
                    if not isinstance(result, UserError):
                        log.error("forward_backward failed", exc_info=result)
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        except BaseException as exc:  # noqa: BLE001
            self._training = None
            log.exception("forward_backward failed")
            for job in training.jobs:
                job.future.set_exception(exc)
        finally:
            self._last_pass_s = time.perf_counter() - started
            self._window_given = False
            if self.sampler.rows:
                self._decode_owed += self._last_pass_s
