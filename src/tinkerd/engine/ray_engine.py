"""Engines as Ray actors (`tinkerd serve --ray ADDRESS`).

Each replica of a base model is a named Ray actor (`EngineActor`) that runs the ordinary
`InProcessEngine` in its own process, on the GPU (or the CPUs) Ray gave it. The API
process holds a `RayEngine` per actor: the same `EngineClient` door, forwarding the same
plain values (`tinkerd.types`) and turning the actor's answers back into
`concurrent.futures.Future`s. No model, tensor or torch import reaches the API process;
checkpoints cross the boundary as directory paths on the data directory every node mounts.
`start_ray_engines` starts the actors and puts the replicas of each model behind a
`ReplicaRouter` (`engine/replicas.py`).

What the door promises and how it is kept across a process boundary:

  * A run's requests reach the engine in the order they were made. Ray runs an async
    actor's calls in any order, so `RayEngine` sends an adapter's next request only once
    its previous one is done (one round trip between a run's requests; other runs' requests
    flow meanwhile, and the engine still batches them together).
  * `sample`'s `on_token` stream: the actor buffers each request's tokens and the client
    fetches them with `next_tokens` calls, each returning every token chosen since the
    last; the final call also returns the result, so no token arrives after it.
  * The engine's start stamp (`mark_started`, what a session's trace splits into queue
    wait and work): each answer carries how long ago the engine began the request, in
    seconds (clocks of two machines do not compare; durations do), and the client stamps
    its future with its own clock minus that.
  * Errors: a `UserError` raised in the actor arrives as the same class (the API answers
    the same 4xx). An actor that dies fails its in-flight requests with `EngineFailed`
    naming the model; Ray starts the actor again (`max_restarts=-1`) and the next request
    waits for it. A run whose adapter lived in the dead process is told its state was lost
    (`EngineActor.require`) and resumes from its last saved state, as after a restart of a
    single-process server. Saved checkpoints are files on shared storage: never lost.

`import ray` happens only here, and only when `--ray` is given: Ray is an optional extra.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinkerd.engine.client import EngineClient
from tinkerd.types import (
    AdamParams,
    AdapterRef,
    EngineFailed,
    EngineStats,
    ForwardBackwardCall,
    LoraSpec,
    SampleRequest,
    SampleResult,
    TokenEvent,
    UserError,
    mark_started,
    started_at,
)

log = logging.getLogger(__name__)

NAMESPACE = "tinkerd"  # the Ray namespace of tinkerd's named actors
STATS_TIMEOUT_S = 1.0  # a scrape waits at most this long for an actor, then shows its last snapshot
# After an actor died, requests wait until it answers again (Ray restarts it), asking every
# RESTART_POLL_S for at most RESTART_WAIT_S; then they are sent whatever its state.
RESTART_POLL_S = 0.5
RESTART_WAIT_S = 600.0


# -- in the actor's process ------------------------------------------------------------------


class _TokenStream:
    """The tokens of one streamed sample request not yet fetched by the client, and its outcome."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.outcome: Future | None = None
        self.ready = asyncio.Event()

    def push(self, event: TokenEvent) -> None:
        self.events.append(event)
        self.ready.set()

    def finish(self, outcome: Future) -> None:
        self.outcome = outcome
        self.ready.set()


async def _timed(future: Future) -> tuple[Any, float | None]:
    """The engine's answer to a request, and how many seconds ago the engine began its work
    (None: the engine did not say)."""
    value = await asyncio.wrap_future(future)
    return value, _busy_for(future)


def _busy_for(future: Future) -> float | None:
    started = started_at(future)
    return None if started is None else time.monotonic() - started


class EngineActor:
    """One replica of a base model's engine, in a Ray actor's process (an async actor: its
    methods wait on the engine's futures without holding a thread each)."""

    def __init__(self, name: str, model_dir: str, device: str | None, kv_cache_bytes: int | None, threads: int,
                 prefix_cache_bytes: int | None = None):
        # The actor's environment sets OMP_NUM_THREADS (`actor_environment`); torch's own
        # thread count is set here and on the engine thread, which runs every tensor op.
        import torch

        torch.set_num_threads(threads)
        from tinkerd.engine.client import InProcessEngine

        self.name = name
        self.engine = InProcessEngine(name, Path(model_dir), device=device, kv_cache_bytes=kv_cache_bytes,
                                      prefix_cache_bytes=prefix_cache_bytes)
        self.engine.run_on_engine_thread(torch.set_num_threads, threads).result()
        self.held: set[str] = set()  # adapters whose state this process holds
        self.streams: dict[str, _TokenStream] = {}

    def info(self) -> Any:
        return self.engine.info

    def process(self) -> dict:
        """The actor's process as the operating system sees it (for operators and tests)."""
        import torch

        return {"pid": os.getpid(), "niceness": os.nice(0),
                "engine_threads": self.engine.run_on_engine_thread(torch.get_num_threads).result()}

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def require(self, adapter_id: str) -> None:
        """A training request names an adapter this process does not hold: the router sent it
        here because the adapter was created here, so this process is a restarted one."""
        if adapter_id not in self.held:
            raise UserError(
                f"the in-memory state of {adapter_id} (its LoRA weights and optimizer state since the last save) was "
                f"lost: the engine of {self.name} restarted after its process died. Saved checkpoints are intact: resume "
                "from the run's last save_state checkpoint (ServiceClient.create_training_client_from_state)")

    # Each request's answer is `_timed`: (the engine's answer, seconds since it began the work).

    async def create_adapter(self, adapter_id: str, spec: LoraSpec) -> tuple[None, float | None]:
        answer = await _timed(self.engine.create_adapter(adapter_id, spec))
        self.held.add(adapter_id)
        return answer

    async def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> tuple[LoraSpec, float | None]:
        answer = await _timed(self.engine.load_adapter(adapter_id, directory, with_optimizer))
        self.held.add(adapter_id)
        return answer

    async def drop_adapter(self, adapter_id: str) -> tuple[None, float | None]:
        self.held.discard(adapter_id)
        return await _timed(self.engine.drop_adapter(adapter_id))

    async def forward_backward(self, call: ForwardBackwardCall) -> tuple[Any, float | None]:
        self.require(call.adapter_id)
        return await _timed(self.engine.forward_backward(_writable(call)))

    async def optim_step(self, adapter_id: str, params: AdamParams) -> tuple[dict, float | None]:
        self.require(adapter_id)
        return await _timed(self.engine.optim_step(adapter_id, params))

    async def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool,
                           sampler_key: str | None) -> tuple[int, float | None]:
        self.require(adapter_id)
        return await _timed(self.engine.save_adapter(adapter_id, directory, with_optimizer, sampler_key))

    async def publish_inflight(self, adapter_id: str, ref: AdapterRef) -> tuple[None, float | None]:
        self.require(adapter_id)
        return await _timed(self.engine.publish_inflight(adapter_id, ref))

    async def sample(self, request: SampleRequest, stream: bool) -> tuple[SampleResult | None, float | None]:
        """The result; with `stream`, None at once, and the tokens and result come through `next_tokens`."""
        if not stream:
            return await _timed(self.engine.sample(request))
        tokens = self.streams.setdefault(request.request_id, _TokenStream())
        loop = asyncio.get_running_loop()
        # Both run on the engine thread, in this order: every token is pushed before the outcome.
        future = self.engine.sample(request, lambda event: loop.call_soon_threadsafe(tokens.push, event))
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(tokens.finish, done))
        return None, None

    async def next_tokens(self, request_id: str) -> tuple[list[TokenEvent], bool, tuple[SampleResult, float | None] | None]:
        """(tokens chosen since the last call, finished, the timed result once finished), waiting
        for news. A failed request raises its error here."""
        tokens = self.streams.setdefault(request_id, _TokenStream())  # `sample` may start after this call
        await tokens.ready.wait()
        tokens.ready.clear()
        events, tokens.events = tokens.events, []
        if tokens.outcome is None:
            return events, False, None
        del self.streams[request_id]
        return events, True, (tokens.outcome.result(), _busy_for(tokens.outcome))

    def cancel(self, request_id: str, sample_index: int | None) -> None:
        self.engine.cancel(request_id, sample_index)


def _writable(call: ForwardBackwardCall) -> ForwardBackwardCall:
    """The call with arrays of its own: the numpy arrays Ray hands an actor are read-only
    views of its object store, and torch tensors made from them must not share that memory."""
    for datum in call.datums:
        if not datum.tokens.flags.writeable:
            datum.tokens = datum.tokens.copy()
        datum.inputs = {key: value if value.flags.writeable else value.copy() for key, value in datum.inputs.items()}
        if datum.stability is not None:
            datum.stability = tuple(a if a.flags.writeable else a.copy() for a in datum.stability)
    return call


# -- in the API process ------------------------------------------------------------------------


def _resolve_timed(out: Future, answer: tuple[Any, float | None]) -> None:
    """Settle `out` with an actor's timed answer, stamped first with when the engine began
    its work by this process's clock (the core reads the stamp in a done callback)."""
    value, busy = answer
    if busy is not None:
        mark_started(out, time.monotonic() - busy)
    out.set_result(value)


# Completions of actor calls are handled here, off Ray's own threads (which must not run our
# callbacks: they send the next request of a run and feed streaming clients).
_completions = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerd-ray")


class RayEngine(EngineClient):
    """The client side of one `EngineActor`."""

    def __init__(self, actor: Any, label: str):
        import ray

        self._ray = ray
        self.actor = actor
        self.label = label  # how errors name it: the model, and the replica when there are several
        self.info = ray.get(actor.info.remote())  # waits for the actor's model to load
        self._last_stats: EngineStats = ray.get(actor.stats.remote())
        self._lock = threading.Lock()
        self._last: dict[str, Future] = {}  # adapter_id -> its latest request
        self._back: Future = Future()  # done while the actor is (believed) alive; new requests wait for it
        self._back.set_result(None)

    # -- calls -------------------------------------------------------------------------------

    def _failure(self, exc: BaseException) -> BaseException:
        """What the caller sees of an actor call's failure."""
        from ray.exceptions import RayActorError, RayTaskError

        if isinstance(exc, RayTaskError):
            return exc.cause if exc.cause is not None else EngineFailed(f"the engine of {self.label} failed: {exc}")
        if isinstance(exc, RayActorError):
            return EngineFailed(
                f"the engine of {self.label} stopped while it held this request (its Ray actor died: "
                f"{type(exc).__name__}). Ray restarts it and the request can be sent again; a training run's state since "
                "its last save is lost, its saved checkpoints are not")
        return exc

    def _settle(self, ref_future: Future, out: Future) -> None:
        if out.done():
            return
        exc = ref_future.exception()
        if exc is None:
            self._resolve(out, ref_future.result())
            return
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError):
            self._await_restart()
        out.set_exception(self._failure(exc))

    def _resolve(self, out: Future, answer: Any) -> None:
        """Settle `out` with the actor's timed answer; one this process cannot read (an actor
        of another tinkerd version) fails the request instead of leaving it waiting."""
        try:
            _resolve_timed(out, answer)
        except Exception as exc:  # noqa: BLE001 - the caller's failure, naming the engine
            out.set_exception(EngineFailed(
                f"the engine of {self.label} answered what this server cannot read ({type(exc).__name__}: {exc}); "
                "tinkerd must be the same version on every node of the cluster"))

    def _await_restart(self) -> None:
        """The actor died: hold new requests until Ray has it running again. (Requests sent to
        an actor Ray has not yet seen die fail, though the one after it would have waited.)"""
        with self._lock:
            if not self._back.done():
                return
            self._back = back = Future()
        log.warning("the engine of %s died; waiting for Ray to restart it", self.label)
        deadline = time.monotonic() + RESTART_WAIT_S

        def ping() -> None:
            self.actor.info.remote().future().add_done_callback(lambda done: _completions.submit(answered, done))

        def answered(done: Future) -> None:
            if done.exception() is None:
                log.warning("the engine of %s is back", self.label)
                back.set_result(None)
            elif time.monotonic() > deadline:
                log.error("the engine of %s did not come back in %.0f s: %s", self.label, RESTART_WAIT_S, done.exception())
                back.set_result(None)  # requests go out again, and fail with the actor's own error
            else:
                threading.Timer(RESTART_POLL_S, ping).start()

        ping()

    def _call_into(self, out: Future, method: str, *args: Any) -> None:
        """Call the actor's `method` (once it is running); its outcome settles `out`."""
        with self._lock:
            back = self._back
        if not back.done():
            back.add_done_callback(lambda _: self._call_into(out, method, *args))
            return
        try:
            ref = getattr(self.actor, method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - e.g. Ray disconnected: the caller's failure
            out.set_exception(self._failure(exc))
            return
        ref.future().add_done_callback(lambda done: _completions.submit(self._settle, done, out))

    def _call(self, method: str, *args: Any) -> Future:
        out: Future = Future()
        self._call_into(out, method, *args)
        return out

    def _in_order(self, adapter_id: str, method: str, *args: Any) -> Future:
        """Call `method` for `adapter_id` once the adapter's previous request is done."""
        out: Future = Future()
        with self._lock:
            before = self._last.get(adapter_id)
            self._last[adapter_id] = out

        def forget(_: Future) -> None:
            with self._lock:
                if self._last.get(adapter_id) is out:
                    del self._last[adapter_id]

        out.add_done_callback(forget)
        if before is None:
            self._call_into(out, method, *args)
        else:
            before.add_done_callback(lambda _: self._call_into(out, method, *args))
        return out

    # -- the door ------------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> Future:
        return self._in_order(adapter_id, "create_adapter", adapter_id, spec)

    def load_adapter(self, adapter_id: str, directory: str, with_optimizer: bool) -> Future:
        return self._in_order(adapter_id, "load_adapter", adapter_id, directory, with_optimizer)

    def drop_adapter(self, adapter_id: str) -> Future:
        return self._in_order(adapter_id, "drop_adapter", adapter_id)

    def forward_backward(self, call: ForwardBackwardCall) -> Future:
        return self._in_order(call.adapter_id, "forward_backward", call)

    def optim_step(self, adapter_id: str, params: AdamParams) -> Future:
        return self._in_order(adapter_id, "optim_step", adapter_id, params)

    def save_adapter(self, adapter_id: str, directory: str, with_optimizer: bool, sampler_key: str | None = None) -> Future:
        return self._in_order(adapter_id, "save_adapter", adapter_id, directory, with_optimizer, sampler_key)

    def publish_inflight(self, adapter_id: str, ref: AdapterRef) -> Future:
        return self._in_order(adapter_id, "publish_inflight", adapter_id, ref)

    def sample(self, request: SampleRequest, on_token: Callable[[TokenEvent], None] | None = None) -> Future:
        if on_token is None:
            return self._call("sample", request, False)
        out: Future = Future()
        request_id = request.request_id

        def on_started(started: Future) -> None:
            if started.exception() is not None:
                self._settle(started, out)
            else:
                poll()

        def poll() -> None:
            try:
                ref = self.actor.next_tokens.remote(request_id)
            except Exception as exc:  # noqa: BLE001 - e.g. Ray disconnected
                out.set_exception(self._failure(exc))
                return
            ref.future().add_done_callback(lambda done: _completions.submit(on_tokens, done))

        def on_tokens(done: Future) -> None:
            if out.done():
                return
            if done.exception() is not None:
                self._settle(done, out)
                return
            events, finished, result = done.result()
            try:
                for event in events:
                    on_token(event)
            except Exception as exc:  # noqa: BLE001 - a broken sink ends its request, not the stream of others
                self.cancel(request_id)
                out.set_exception(exc)
                return
            if finished:
                self._resolve(out, result)
            else:
                poll()

        self._call("sample", request, True).add_done_callback(on_started)
        return out

    def cancel(self, request_id: str, sample_index: int | None = None) -> None:
        try:
            self.actor.cancel.remote(request_id, sample_index)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to cancel
            log.debug("cancel of %s on %s not sent", request_id, self.label, exc_info=True)

    def shutdown(self) -> None:
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def stats(self) -> EngineStats:
        """A fresh snapshot from the actor, or its last one while the actor does not answer
        (restarting, busy loading): a scrape never waits long."""
        from ray.exceptions import GetTimeoutError, RayError

        try:
            self._last_stats = self._ray.get(self.actor.stats.remote(), timeout=STATS_TIMEOUT_S)
        except (GetTimeoutError, RayError):
            pass
        return self._last_stats


# -- starting the actors -------------------------------------------------------------------------


class RayClusterError(RuntimeError):
    """The cluster cannot be reached or cannot hold the engines asked for."""


@dataclass(frozen=True)
class ReplicaPlan:
    """How one base model runs on the cluster."""

    replicas: int = 1
    gpus: float | None = None  # per replica; None: 1 on a cluster with GPUs, else 0
    cpus: float | None = None  # per replica; None: 1 with a GPU, else a share of the largest node's CPUs


def connect(address: str) -> None:
    """Join the cluster at `address` (as `ray.init` takes it: HOST:PORT, ray://..., or auto).

    Authentication is Ray's own: with token authentication on (RAY_AUTH_MODE=token) Ray's
    client library reads the cluster's token from RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, as `ray` CLI commands do.
    """
    try:
        import ray
    except ImportError:
        raise RayClusterError('--ray needs Ray: pip install "tinkerd[ray]"') from None
    from ray.exceptions import AuthenticationError

    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:  # HOST:PORT: fail fast where nothing listens (Ray itself retries for minutes)
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise RayClusterError(f"cannot join the Ray cluster at {address}: {exc}") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, configure_logging=False)
    except AuthenticationError as exc:
        raise RayClusterError(f"the Ray cluster at {address} refused tinkerd: {exc}") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address}: {exc} (a refused token shows in "
                              "Ray's log lines above)") from None


def actor_environment(threads: int) -> dict:
    """What an engine actor's process starts with. Ray starts workers with one OpenMP thread
    (a CPU engine would use one core of those it was given) and at niceness 15 (an engine
    would lose its cores to any other process on the node); the engine is the node's work."""
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "RAY_worker_niceness": "0"}}


def _largest_node_cpus(ray: Any) -> float:
    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(cpus, default=1.0)


def start_ray_engines(models: list[tuple[str, Path]], plans: dict[str, ReplicaPlan], device: str | None,
                      kv_cache_bytes: int | None, prefix_cache_bytes: int | None = None) -> dict[str, EngineClient]:
    """Start every replica of every model as a named actor (`<model>#<replica>` in the
    `tinkerd` namespace), wait for all of them to load, and route each model's requests
    over its replicas. Call `connect` first."""
    import ray

    from tinkerd.engine.replicas import ReplicaRouter

    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    total_replicas = sum(plans.get(name, ReplicaPlan()).replicas for name, _ in models)
    actor_class = ray.remote(EngineActor)
    started: dict[str, list[tuple[Any, str]]] = {}
    for name, model_dir in models:
        plan = plans.get(name, ReplicaPlan())
        gpus = plan.gpus if plan.gpus is not None else (1.0 if cluster_gpus else 0.0)
        if gpus > 1:
            raise RayClusterError(f"{name}: --gpus-per-replica {gpus:g}: an engine runs on one GPU; a model larger than one "
                                  "GPU is not supported yet (docs/scaling.md)")
        if plan.cpus is not None:
            cpus = plan.cpus
        elif gpus:
            cpus = 1.0
        else:  # a CPU cluster: the replicas share the largest node (tinkerd cannot know where Ray puts them)
            cpus = max(1.0, float(int(_largest_node_cpus(ray) // total_replicas)))
        threads = max(1, int(cpus))
        log.info("starting %d replica(s) of %s on Ray: %g GPU and %g CPU each, %d thread(s)", plan.replicas, name, gpus, cpus, threads)
        started[name] = []
        for index in range(plan.replicas):
            actor_name = f"{name}#{index}"
            try:
                actor = actor_class.options(
                    name=actor_name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus,
                    max_restarts=-1, max_task_retries=0, max_concurrency=1000, runtime_env=actor_environment(threads),
                ).remote(name, str(model_dir), device, kv_cache_bytes, threads, prefix_cache_bytes)
            except ValueError as exc:  # a live actor of that name: another tinkerd serves this model here
                raise RayClusterError(f"cannot start actor {actor_name!r} in namespace {NAMESPACE!r}: {exc}") from None
            label = name if plan.replicas == 1 else f"{name} (replica {index})"
            started[name].append((actor, label))
    engines: dict[str, EngineClient] = {}
    for name, actors in started.items():
        replicas = [_started_engine(ray, actor, label) for actor, label in actors]
        engines[name] = replicas[0] if len(replicas) == 1 else ReplicaRouter(replicas)
    return engines


def _started_engine(ray: Any, actor: Any, label: str) -> RayEngine:
    """The client of `actor` once its model has loaded; while Ray has not placed it (no node
    has the GPUs or CPUs it asks for), says so every half minute."""
    from ray.exceptions import GetTimeoutError, RayError

    loaded = actor.info.remote()
    while True:
        try:
            ray.get(loaded, timeout=30)
            break
        except GetTimeoutError:
            log.warning("the engine of %s has not started after 30 s more: loading a large model, or no node has the "
                        "resources it asks for (cluster has available: %s)", label, ray.available_resources())
        except RayError as exc:
            raise RayClusterError(f"the engine of {label} did not start: {exc}") from None
    return RayEngine(actor, label)
