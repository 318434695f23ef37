"""The state that outlives a request: sessions, training runs, checkpoints, samplers.

The API layer calls into `Service` with plain values; `Service` keeps metadata in the
database and files under the data dir, orders each model's requests by `seq_id`, and
hands tensor work to the engine of the right base model through its door
(`EngineClient`). Sampling goes through `core/sampling.py`, the path both front doors take.

Every call names the user it acts for; sessions, models and samplers are that user's, and
another user's answer as if they did not exist (core/access.py).

What happens when an engine request completes (database commits with fsync, checkpoint
directory removal, metric rows, sampler registration) runs on one bookkeeping thread, in
completion order: never on the engine's thread, so a decode step never waits on a disk,
and never on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from tinkerd.core import audit, sampling
from tinkerd.core.access import SYSTEM, User
from tinkerd.core.completions import CompletionLogs
from tinkerd.core.custom_losses import CustomLosses
from tinkerd.core.db import (
    CheckpointRow,
    MetricRow,
    ProjectRow,
    RunRow,
    SamplerRow,
    SessionRow,
    aware,
    default_database_url,
    open_database,
    utcnow,
)
from tinkerd.core.futures import Failure, FutureEntry, FutureStore
from tinkerd.core.paths import TinkerPath, check_checkpoint_name
from tinkerd.core.provenance import SequenceRecord, StabilityStore, check_tiling, stability_for_datum
from tinkerd.core.registry import MAX_TTL_SECONDS, Registry, check_checkpoint_files, checkpoint_query, disk_full_message
from tinkerd.core.sampling import InflightWeights, SampleTarget, Sampling
from tinkerd.core.traces import RequestSpan, SessionTraces, TraceTag
from tinkerd.core.work_cap import DEFAULT_MAX_QUEUED_PER_USER, WorkCap
from tinkerd.types import (
    AdamParams,
    AdapterRef,
    Datum,
    EngineFailed,
    ForwardBackwardCall,
    LoraSpec,
    NotFound,
    SampleRequest,
    SampleResult,
    TrainResult,
    UserError,
    started_at,
)

if TYPE_CHECKING:
    from tinkerd.engine.client import EngineClient

log = logging.getLogger(__name__)

_SEEN_WINDOW = 4096  # how many past seq_ids per model stay deduplicated
# The engine allocates the adapter from its rank (10**6 asked for ~0.9 TB); 512 is well past
# the ranks LoRA fine-tuning uses (8 to 128).
MAX_LORA_RANK = 512


@dataclass
class ModelState:
    run_id: str
    session_id: str
    owner: str
    engine: EngineClient
    next_seq: int = 1
    last_request: dt.datetime | None = None  # committed as the run's last_request_time with its next metrics or save
    # seq_id → (submit: hands the request to the engine's door, its entry, what to do with the result)
    pending: dict[int, tuple[Callable[[], Future], FutureEntry, Callable[[Any], Any] | None]] = field(default_factory=dict)
    # seq_id → its entry, for as long as the futures store keeps it: a retry gets the same
    # future. Weak, so that a result goes when its retention ends (core/futures.py), not
    # when 4096 later requests have pushed it out of the window.
    seen: weakref.WeakValueDictionary[int, FutureEntry] = field(default_factory=weakref.WeakValueDictionary)
    inflight: InflightWeights | None = None  # made by the model's first in-flight save


@dataclass
class SamplerState:
    sampler_id: str
    session_id: str
    owner: str
    target: SampleTarget
    model_path: str | None
    # seq_id → (its entry, weakly as in ModelState.seen, and its sequence ids)
    seen: dict[int, tuple[weakref.ref[FutureEntry], list[str]]] = field(default_factory=dict)


def failure_from_exception(exc: BaseException) -> Failure:
    if isinstance(exc, UserError):
        return Failure(str(exc), "user")
    if isinstance(exc, EngineFailed):
        return Failure(str(exc), "server")
    if (message := disk_full_message(exc)) is not None:
        return Failure(message, "server")
    if isinstance(exc, OSError):
        return Failure(f"storage error: {exc}", "server")
    return Failure(f"internal error: {type(exc).__name__}: {exc}", "server")


def _done(value: Any = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _both(first: Future, second: Future) -> Future:
    """`first`'s result once both are done, or the failure of either."""
    out: Future = Future()
    waiting = [first, second]

    def done(_: Future) -> None:
        with lock:
            if any(not f.done() for f in waiting) or out.done():
                return
            failed = next((f.exception() for f in waiting if f.exception() is not None), None)
            if failed is not None:
                out.set_exception(failed)
            else:
                out.set_result(first.result())

    lock = threading.Lock()
    first.add_done_callback(done)
    second.add_done_callback(done)
    return out


class Service:
    def __init__(self, data_dir: Path, engines: dict[str, EngineClient], session_timeout: float = 120.0,
                 database_url: str | None = None, max_queued_per_user: int = DEFAULT_MAX_QUEUED_PER_USER):
        """`database_url`: where metadata lives (None: the SQLite file in `data_dir`).
        `max_queued_per_user`: requests of one user in progress at once, past which the server
        answers 429 (0: no cap; core/work_cap.py)."""
        self.data_dir = data_dir
        self.engines = engines
        self.session_timeout = session_timeout
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_database(database_url or default_database_url(data_dir))
        self.registry = Registry(self.db, data_dir)
        self.sampling = Sampling(engines, self.adapter_for_path)
        self.traces = SessionTraces()  # what each session's requests did when (`tinker session export-trace`)
        self.futures = FutureStore(traces=self.traces)
        self.completions = CompletionLogs(self.futures)  # per-sampler, for retrieve_futures
        self.work = WorkCap(max_queued_per_user, self.futures)
        self.models: dict[str, ModelState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self.session_seen: dict[str, float] = {}
        self.session_owners: dict[str, str] = {}  # live sessions
        self.stability = StabilityStore()
        self.custom_losses = CustomLosses()
        self._bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerd-bookkeeping")
        self._janitor: asyncio.Task | None = None
        self._recover_after_restart()

    # -- lifecycle ---------------------------------------------------------------------------

    def _recover_after_restart(self) -> None:
        """Sessions from a previous process are over: their in-memory state died with it."""
        with self.db.begin() as s:
            for row in s.scalars(select(SessionRow).where(SessionRow.status == "active")):
                row.status = "expired"
        for tmp in (self.data_dir / "checkpoints").glob("**/.*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # half-written checkpoints of a crash
        self.registry.remove_orphan_files()  # written-but-never-acknowledged dirs, dead ephemeral samplers

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.futures.bind_loop(loop)
        self._janitor = loop.create_task(self._janitor_loop())

    async def stop(self) -> None:
        if self._janitor:
            self._janitor.cancel()
        self._bookkeeping.shutdown(wait=True)

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.session_timeout / 4))
            try:
                self.expire_idle_sessions()
                # Deleting files and rows waits on the disk: not on the event loop.
                await asyncio.wrap_future(self._bookkeeping.submit(self.delete_expired_checkpoints))
                self.stability.expire()
            except Exception:  # noqa: BLE001 - the janitor must keep running
                log.exception("janitor pass failed")

    def expire_idle_sessions(self) -> list[str]:
        now = asyncio.get_running_loop().time()
        expired = [sid for sid, seen in self.session_seen.items() if now - seen > self.session_timeout]
        for sid in expired:
            self._end_session(sid, "expired")
        return expired

    def _end_session(self, session_id: str, status: str) -> None:
        self.session_seen.pop(session_id, None)
        self.session_owners.pop(session_id, None)
        for model_id in [m for m, st in self.models.items() if st.session_id == session_id]:
            state = self.models.pop(model_id)
            state.engine.drop_adapter(model_id)
        for sampler_id in [k for k, st in self.samplers.items() if st.session_id == session_id]:
            del self.samplers[sampler_id]
            self.completions.drop_sampler(sampler_id)
        self.futures.drop_session(session_id)
        self.custom_losses.drop_session(session_id)
        with self.db.begin() as s:
            row = s.get(SessionRow, session_id)
            if row is not None and row.status == "active":
                row.status = status
        log.info("session %s %s: adapters freed", session_id, status)

    def delete_expired_checkpoints(self) -> int:
        now = utcnow()
        with self.db.begin() as s:
            rows = [r for r in s.scalars(select(CheckpointRow).where(CheckpointRow.expires_at.is_not(None))) if aware(r.expires_at) <= now]
            for row in rows:
                audit.record(s, "expire", row, SYSTEM.name, expired_at=aware(row.expires_at).isoformat())
                s.delete(row)
        for row in rows:  # after the commit: a crash in between leaves an orphan dir, never a listed checkpoint without files
            shutil.rmtree(row.directory, ignore_errors=True)
        return len(rows)

    # -- sessions ----------------------------------------------------------------------------

    def _touch(self, session_id: str) -> None:
        if session_id in self.session_seen:
            self.session_seen[session_id] = asyncio.get_running_loop().time()

    def create_session(self, tags: list[str], user_metadata: dict, user: User, project_id: str | None = None) -> str:
        """A new session of `user`; with `project_id` (a project they are a member of), its
        runs and checkpoints are in that project."""
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        with self.db.begin() as s:
            if project_id is not None:
                self._check_project(s, project_id, user)
            s.add(SessionRow(id=session_id, tags=list(tags), user_metadata=dict(user_metadata), owner=user.name,
                             project_id=project_id))
        self.session_seen[session_id] = asyncio.get_running_loop().time()
        self.session_owners[session_id] = user.name
        return session_id

    @staticmethod
    def _check_project(s: Any, project_id: str, user: User) -> None:
        """NotFound unless the project exists and `user` is a member (or an admin): a project
        one is not in answers as one that does not exist."""
        if not isinstance(project_id, str) or s.get(ProjectRow, project_id) is None or not user.reads_project(project_id):
            raise NotFound(f"unknown project {project_id!r} (projects are made with `tinkerd projects create`, "
                           "and only their members may use them)", field="project_id")

    def assign_session_project(self, session_id: str, project_id: str, user: User) -> None:
        """Move one of `user`'s sessions, with its training runs, into a project they are a member of."""
        with self.db.begin() as s:
            row = s.get(SessionRow, session_id)
            if row is None or not user.owns(row.owner):
                raise NotFound(f"unknown session {session_id!r}")
            self._check_project(s, project_id, user)
            row.project_id = project_id
            for run in s.scalars(select(RunRow).where(RunRow.session_id == session_id)):
                run.project_id = project_id

    def heartbeat(self, session_id: str, user: User) -> bool:
        """False when the session is gone (the SDK then stops heartbeating), or is not `user`'s."""
        if session_id not in self.session_seen or not user.owns(self.session_owners.get(session_id)):
            return False
        self._touch(session_id)
        return True

    def finish_session(self, session_id: str, user: User) -> None:
        with self.db.begin() as s:
            row = s.get(SessionRow, session_id)
            if row is None or not user.owns(row.owner):
                raise NotFound(f"unknown session {session_id!r}")
        self._end_session(session_id, "finished")

    def _require_session(self, session_id: str, user: User) -> str:
        """The owner of a live session of `user`'s; NotFound otherwise."""
        owner = self.session_owners.get(session_id)
        if session_id not in self.session_seen or not user.owns(owner):
            raise NotFound(f"unknown or expired session {session_id!r}")
        self._touch(session_id)
        return owner or user.name

    def future_for(self, request_id: str, user: User) -> FutureEntry | None:
        """A request's future, if it is one of `user`'s sessions' (None otherwise, as for an unknown id)."""
        entry = self.futures.get(request_id)
        if entry is None or entry.session_id is None:
            return entry
        owner = self.session_owners.get(entry.session_id)
        if owner is None:  # the session ended while this request ran
            with self.db() as s:
                row = s.get(SessionRow, entry.session_id)
            owner = row.owner if row is not None else None
        return entry if user.owns(owner) else None

    # -- engines -----------------------------------------------------------------------------

    def engine_for(self, base_model: str) -> EngineClient:
        return self.sampling.engine_for(base_model)

    def _chain(self, future: Future, entry: FutureEntry, on_done: Callable[[Any], Any] | None = None,
               on_failure: Callable[[], Any] | None = None) -> None:
        """Resolve `entry` with the engine's result, after `on_done` ran on the bookkeeping thread.
        The engine may keep a finished future (a model's last operation, to order its next one):
        its callback lets go of the entry once it ran, so that the result lives only as long as
        the futures store keeps it."""
        unresolved = [entry]

        def complete(f: Future) -> None:
            entry = unresolved.pop()
            try:
                result = f.result()
                self.futures.resolve(entry, on_done(result) if on_done else result)
            except BaseException as exc:  # noqa: BLE001 - becomes the request's failure
                if on_failure is not None:
                    on_failure()
                if not isinstance(exc, UserError):
                    log.exception("request %s failed", entry.request_id)
                self.futures.resolve(entry, failure=failure_from_exception(exc))

        def engine_done(f: Future) -> None:
            if unresolved:  # the times the session's trace shows (core/traces.py)
                unresolved[0].started, unresolved[0].computed = started_at(f), time.monotonic()
            self._bookkeeping.submit(complete, f)

        future.add_done_callback(engine_done)

    # -- ordered training requests -----------------------------------------------------------

    def _model(self, model_id: str, user: User) -> ModelState:
        state = self.models.get(model_id)
        if state is None or not user.owns(state.owner):
            raise NotFound(f"unknown model_id {model_id!r} (never created, or its session ended)")
        self._touch(state.session_id)
        return state

    def session_of_model(self, model_id: str, user: User) -> str:
        return self._model(model_id, user).session_id

    def submit_ordered(
        self,
        model_id: str,
        user: User,
        seq_id: int | None,
        kind: str,
        submit: Callable[[], Future],
        on_done: Callable[[Any], Any] | None = None,
        trace_as: tuple[str, dict[str, Any]] | None = None,
    ) -> FutureEntry:
        """Hand `submit` to the engine once every lower seq_id of this model has been handed over.
        `trace_as`: the request's name and sizes in the session's trace (default: `kind`)."""
        state = self._model(model_id, user)
        if seq_id is not None and seq_id < 1:
            # seq_id 0 is the model's creation: answering its future would train nothing, silently.
            raise UserError(f"seq_id must be >= 1 (0 is the model's creation), got {seq_id}", field="seq_id")
        if seq_id is not None and seq_id in state.seen:
            return state.seen[seq_id]  # a retry: same future, no second execution
        if kind != "skipped":
            self.work.admit(user)
        entry = self.futures.create(kind, state.session_id, owner=user.name)
        if kind != "skipped":
            name, args = trace_as or (kind, {})
            entry.trace = TraceTag(model_id, name, seq_id, args)
        state.last_request = utcnow()
        if seq_id is None or seq_id < state.next_seq:
            self._chain(submit(), entry, on_done)
            return entry
        state.seen[seq_id] = entry
        state.pending[seq_id] = (submit, entry, on_done)
        while state.next_seq in state.pending:
            submit_, entry_, on_done_ = state.pending.pop(state.next_seq)
            self._chain(submit_(), entry_, on_done_)
            state.next_seq += 1
        for old in [s for s in state.seen if s < state.next_seq - _SEEN_WINDOW]:
            del state.seen[old]
        return entry

    def skip_seq(self, model_id: str, seq_id: int | None, user: User) -> None:
        """Consume a seq_id whose request was refused at submission.

        The SDK numbers every request; if a refused one left a gap, every later request
        of that training client would wait for it forever. Only the model's owner's requests
        count: another user's request naming this model must not use up its owner's seq_ids.
        """
        state = self.models.get(model_id)
        if state is None or not user.owns(state.owner) or seq_id is None or seq_id in state.seen or seq_id < state.next_seq:
            return
        self.submit_ordered(model_id, user, seq_id, "skipped", _done)

    # -- models ------------------------------------------------------------------------------

    def create_model(
        self, session_id: str, model_seq_id: int, base_model: str, spec: LoraSpec, user_metadata: dict, user: User
    ) -> tuple[str, FutureEntry]:
        owner = self._require_session(session_id, user)
        engine = self.engine_for(base_model)
        if not (1 <= spec.rank <= MAX_LORA_RANK):
            raise UserError(f"lora_config.rank must be between 1 and {MAX_LORA_RANK}, got {spec.rank}", field="rank")
        if spec.seed is not None and abs(spec.seed) >= 2**63:
            raise UserError(f"lora_config.seed must be within ±2**63, got {spec.seed}", field="seed")
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self.models:
            return model_id, self.models[model_id].seen.get(0) or self.futures.create("create_model", session_id)
        if spec.seed is None:
            spec = LoraSpec(spec.rank, spec.train_attn, spec.train_mlp, spec.train_unembed, int(uuid.uuid4().int % 2**31))
        self.work.admit(user)
        state = ModelState(run_id=model_id, session_id=session_id, owner=owner, engine=engine)
        self.models[model_id] = state
        entry = self.futures.create("create_model", session_id, owner=user.name)
        entry.trace = TraceTag(model_id, "create_model", 0, {"base_model": base_model, "lora_rank": spec.rank})
        state.seen[0] = entry

        def on_done(_: Any) -> dict:
            self._record_run(model_id, session_id, owner, base_model, spec, user_metadata)
            return {"model_id": model_id}

        self._chain(engine.create_adapter(model_id, spec), entry, on_done, on_failure=lambda: self.models.pop(model_id, None))
        return model_id, entry

    def _record_run(self, run_id: str, session_id: str, owner: str, base_model: str, spec: LoraSpec,
                    user_metadata: dict | None) -> None:
        with self.db.begin() as s:
            session = s.get(SessionRow, session_id)
            s.merge(
                RunRow(
                    id=run_id, session_id=session_id, owner=owner, base_model=base_model, lora_rank=spec.rank,
                    train_attn=spec.train_attn, train_mlp=spec.train_mlp, train_unembed=spec.train_unembed,
                    seed=spec.seed, user_metadata=dict(user_metadata or {}),
                    project_id=session.project_id if session is not None else None,
                )
            )

    def get_run(self, run_id: str, user: User) -> RunRow:
        """A run `user` owns (NotFound otherwise, as for an unknown one)."""
        return self.registry.run_row(run_id, user)

    def forward_backward(
        self, model_id: str, seq_id: int, datums: list[Datum], loss_fn: str, config: dict, forward_only: bool, user: User
    ) -> FutureEntry:
        state = self._model(model_id, user)
        self._attach_provenance(state.session_id, datums, loss_fn)
        if loss_fn == "custom":  # the engine gets the loss itself, as checked data
            config = {"graph": self.custom_losses.graph_for(config.get("loss_id"), state.session_id)}
        call = ForwardBackwardCall(model_id, datums, loss_fn, config, forward_only)

        def record(result: TrainResult) -> TrainResult:
            self._record_metrics(model_id, seq_id, "forward" if forward_only else "forward_backward", result.metrics)
            return result

        sizes = {"datums": len(datums), "tokens": sum(len(d.tokens) for d in datums), "loss_fn": loss_fn}
        return self.submit_ordered(model_id, user, seq_id, "fwdbwd", lambda: state.engine.forward_backward(call), record,
                                   trace_as=("forward" if forward_only else "forward_backward", sizes))

    def _attach_provenance(self, session_id: str, datums: list[Datum], loss_fn: str) -> None:
        for i, d in enumerate(datums):
            if d.model_input_spans is None:
                if loss_fn == "stable_reinforce":
                    raise UserError(
                        f"datum {i}: stable_reinforce needs provenance spans (model_input_spans and loss_fn_input_spans) "
                        "naming sequences sampled with record_stability_info=True"
                    )
                continue
            check_tiling(d.model_input_spans, len(d.tokens), f"datum {i} model_input_spans")
            targets = d.inputs.get("target_tokens")
            n_targets = len(targets) if targets is not None else 0
            check_tiling(d.loss_fn_input_spans or [], n_targets, f"datum {i} loss_fn_input_spans")
            if loss_fn == "stable_reinforce" and targets is not None:
                d.stability = stability_for_datum(d.loss_fn_input_spans or [], targets, self.stability, session_id)

    def create_custom_loss(self, session_id: str, seq_id: Any, name: Any, inputs: Any, graph: Any, user: User) -> FutureEntry:
        """Check and keep a loss for `loss_fn="custom"` (core/custom_losses.py). The SDK waits
        on a future for the loss_id; it is resolved at once, and a refused loss is a 400."""
        self._require_session(session_id, user)
        loss_id = self.custom_losses.create(session_id, seq_id, name, inputs, graph)
        entry = self.futures.create("create_custom_loss", session_id)
        self.futures.resolve(entry, {"loss_id": loss_id, "type": "create_custom_loss"})
        return entry

    def optim_step(self, model_id: str, seq_id: int | None, params: AdamParams, user: User) -> FutureEntry:
        state = self._model(model_id, user)
        if seq_id is None:  # the SDK always sends one; the step's metrics are recorded under it
            raise UserError("optim_step needs seq_id", field="seq_id")

        def record(metrics: dict[str, float]) -> dict:
            self._record_metrics(model_id, seq_id, "optim_step", {**metrics, "learning_rate:mean": params.learning_rate})
            return {"metrics": metrics}

        return self.submit_ordered(model_id, user, seq_id, "optim_step", lambda: state.engine.optim_step(model_id, params), record,
                                   trace_as=("optim_step", {"learning_rate": params.learning_rate}))

    def _record_metrics(self, run_id: str, seq_id: int, kind: str, metrics: dict[str, float]) -> None:
        with self.db.begin() as s:
            for key, value in metrics.items():
                s.add(MetricRow(run_id=run_id, seq_id=seq_id, kind=kind, key=key, value=float(value)))
            self._note_last_request(s, run_id)

    def _note_last_request(self, s: Any, run_id: str) -> None:
        """The run's last_request_time (RestClient shows it), in a transaction the request's
        result commits anyway: each commit waits for the disk, and with several tenants the
        results queue behind each other's commits on the bookkeeping thread."""
        state = self.models.get(run_id)
        run = s.get(RunRow, run_id)
        if state is not None and state.last_request is not None and run is not None:
            run.last_request_time = state.last_request

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_dir(self, path: TinkerPath) -> Path:
        return self.data_dir / "checkpoints" / path.run_id / path.kind / path.name

    def save_checkpoint(
        self,
        model_id: str,
        seq_id: int,
        name: str | None,
        kind: str,
        ttl_seconds: int | None = None,
        overwrite: bool = True,
        user_metadata: dict | None = None,
        sampler_session: tuple[str, int] | None = None,
        *,
        user: User,
        inflight: bool = False,
    ) -> FutureEntry:
        """save_weights (kind=weights), save_weights_for_sampler (sampler_weights), external.

        `inflight` (sampler saves of kind "inflight"): the weights are also published as the
        model's in-flight weights, which every in-flight sampling client of the model samples
        from then on. Without a name that is all that happens (no file is written) and the
        answer is a new in-flight sampling client; with a name the checkpoint is saved as
        usual too, and the answer is its path."""
        state = self._model(model_id, user)  # raises NotFound for an unknown model, or another user's
        engine = state.engine
        if inflight and kind != "sampler_weights":
            raise UserError("only sampler saves can be in-flight", field="kind")
        if inflight and state.inflight is None:
            state.inflight = InflightWeights(model_id)
        live = state.inflight if inflight else None
        published: list[AdapterRef] = []  # the version this request publishes, once it is handed to the engine

        def publish() -> Future:
            ref = live.next_ref()  # type: ignore[union-attr] - numbered here: in the model's request order
            published.append(ref)
            return engine.publish_inflight(model_id, ref)

        if name is None and live is not None:
            if sampler_session is None:
                raise UserError("path is required")
            session_id, sampling_seq = sampler_session
            sampler_id = f"{session_id}:sample:{sampling_seq}"
            run = self.get_run(model_id, user)

            def on_published(_: None) -> dict:
                live.published(published[0])
                target = SampleTarget(run.base_model, self.engine_for(run.base_model), published[0], inflight=live)
                self._register_sampler(sampler_id, session_id, state.owner, target, None)
                return {"sampling_session_id": sampler_id}

            return self.submit_ordered(model_id, user, seq_id, "save", publish, on_published)
        if name is None:
            # save_weights_and_get_sampling_client: an ephemeral, unlisted snapshot.
            if sampler_session is None:
                raise UserError("path is required")
            session_id, sampling_seq = sampler_session
            sampler_id = f"{session_id}:sample:{sampling_seq}"
            directory = str(self.data_dir / "ephemeral" / sampler_id)
            key = f"ephemeral:{sampler_id}:{uuid.uuid4().hex[:8]}"
            run = self.get_run(model_id, user)

            def on_ephemeral_saved(_: int) -> dict:
                target = SampleTarget(run.base_model, self.engine_for(run.base_model), AdapterRef(key, directory))
                self._register_sampler(sampler_id, session_id, state.owner, target, None)
                return {"sampling_session_id": sampler_id}

            return self.submit_ordered(
                model_id, user, seq_id, "save", lambda: engine.save_adapter(model_id, directory, False, key), on_ephemeral_saved
            )
        check_checkpoint_name(name)
        if ttl_seconds is not None and not (1 <= ttl_seconds <= MAX_TTL_SECONDS):
            raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (10 years), got {ttl_seconds}")
        path = TinkerPath(model_id, kind, name)
        row_id = uuid.uuid4().hex[:8]
        # One directory per saved version: an overwrite never touches the files a listed row points at.
        directory = self.checkpoint_dir(path).with_name(f"{name}@{row_id}")
        if kind == "weights" and not overwrite:
            with self.db() as s:
                exists = s.scalar(checkpoint_query(path))
            if exists is not None:
                raise UserError(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        with_optimizer = kind == "weights"
        sampler_key = f"{path}@{row_id}" if kind == "sampler_weights" else None

        def on_saved(size: int) -> dict:
            if published:
                live.published(published[0])  # type: ignore[union-attr]
            replaced_dirs: list[str] = []
            expires = utcnow() + dt.timedelta(seconds=ttl_seconds) if ttl_seconds else None
            with self.db.begin() as s:
                old = s.scalar(checkpoint_query(path))
                if old is not None:
                    replaced_dirs.append(old.directory)
                    s.delete(old)
                    s.flush()
                row = CheckpointRow(
                    run_id=model_id, kind=kind, name=name, directory=str(directory), size_bytes=size,
                    user_metadata={**(user_metadata or {}), "_cache_key": sampler_key or ""},
                    expires_at=expires, has_optimizer=with_optimizer,
                )
                s.add(row)
                audit.record(s, "create", row, user.name, size_bytes=size, replaced=old is not None)
                self._note_last_request(s, model_id)
            for old_dir in replaced_dirs:
                if old_dir != str(directory):
                    shutil.rmtree(old_dir, ignore_errors=True)
            result = {"path": str(path)}
            if kind == "external_weights":
                result["size_bytes"] = size
            return result

        def save() -> Future:
            saved = engine.save_adapter(model_id, str(directory), with_optimizer, sampler_key)
            return saved if live is None else _both(saved, publish())

        return self.submit_ordered(model_id, user, seq_id, "save", save, on_saved)

    def find_checkpoint(self, tinker_path: str, user: User, on_behalf_of: User | None = None) -> CheckpointRow:
        """A checkpoint `user` may read: their own, their projects', or a published one; or,
        given `on_behalf_of` (the user of a `weights_access_token`), one that user may read."""
        path = TinkerPath.parse(tinker_path)
        try:
            return self.registry.checkpoint(path, user)
        except NotFound:
            if on_behalf_of is None:
                raise
            return self.registry.checkpoint(path, on_behalf_of)

    def load_weights(
        self,
        path: str,
        with_optimizer: bool,
        model_id: str | None = None,
        seq_id: int | None = None,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        user_metadata: dict | None = None,
        *,
        user: User,
        on_behalf_of: User | None = None,
    ) -> tuple[str, FutureEntry]:
        """Create-via-load (session_id + model_seq_id) or legacy load into an existing model,
        from a checkpoint `user` (or `on_behalf_of`, see find_checkpoint) may read."""
        if model_id is not None:
            self._model(model_id, user)  # another user's model is unknown, whatever the path
        row = self.find_checkpoint(path, user, on_behalf_of)
        if with_optimizer and not row.has_optimizer:
            raise UserError(f"{path} has no optimizer state (only save_state checkpoints do)")
        source_run = self.registry.run_row(row.run_id, SYSTEM)  # readable through its checkpoint
        directory = row.directory
        check_checkpoint_files(Path(directory), path, with_optimizer)
        if model_id is not None:
            engine = self._model(model_id, user).engine
            return model_id, self.submit_ordered(
                model_id, user, seq_id, "load", lambda: engine.load_adapter(model_id, directory, with_optimizer), lambda _: {"path": path},
                trace_as=("load_weights", {"path": path}),
            )
        if session_id is None or model_seq_id is None:
            raise UserError("load_weights needs model_id, or session_id and model_seq_id")
        owner = self._require_session(session_id, user)
        engine = self.engine_for(source_run.base_model)
        new_id = f"{session_id}:train:{model_seq_id}"
        if new_id in self.models and 0 in self.models[new_id].seen:
            return new_id, self.models[new_id].seen[0]
        self.work.admit(user)
        state = ModelState(run_id=new_id, session_id=session_id, owner=owner, engine=engine)
        self.models[new_id] = state
        entry = self.futures.create("load", session_id, owner=user.name)
        entry.trace = TraceTag(new_id, "load_weights", 0, {"path": path})
        state.seen[0] = entry

        def on_done(spec: LoraSpec) -> dict:
            self._record_run(new_id, session_id, owner, source_run.base_model, spec, user_metadata or source_run.user_metadata)
            return {"path": path, "model_id": new_id}

        self._chain(engine.load_adapter(new_id, directory, with_optimizer), entry, on_done,
                    on_failure=lambda: self.models.pop(new_id, None))
        return new_id, entry

    # -- sampling ----------------------------------------------------------------------------

    def _register_sampler(self, sampler_id: str, session_id: str, owner: str, target: SampleTarget, model_path: str | None) -> None:
        self.samplers[sampler_id] = SamplerState(sampler_id, session_id, owner, target, model_path)
        with self.db.begin() as s:
            s.merge(SamplerRow(id=sampler_id, session_id=session_id, base_model=target.base_model, model_path=model_path))

    def adapter_for_path(self, model_path: str, user: User) -> tuple[str, AdapterRef]:
        """(base model, adapter ref) for a checkpoint path `user` may read; raises NotFound/UserError naming it."""
        row = self.find_checkpoint(model_path, user)
        check_checkpoint_files(Path(row.directory), model_path)
        run = self.registry.run_row(row.run_id, SYSTEM)  # readable through its checkpoint
        key = (row.user_metadata or {}).get("_cache_key") or f"{model_path}@{row.id}"
        return run.base_model, AdapterRef(key=key, directory=row.directory)

    def create_sampling_session(
        self, session_id: str, sampling_seq: int, base_model: str | None, model_path: str | None, user: User
    ) -> str:
        owner = self._require_session(session_id, user)
        began = time.monotonic()
        if not (model_path or base_model):
            raise UserError("create_sampling_session needs base_model or model_path")
        target = self.sampling.resolve(model_path or base_model, user)  # type: ignore[arg-type]
        sampler_id = f"{session_id}:sample:{sampling_seq}"
        self._register_sampler(sampler_id, session_id, owner, target, model_path)
        ended = time.monotonic()
        tag = TraceTag(sampler_id, "create_sampling_session", None, {"model": model_path or base_model})
        self.traces.record(session_id, RequestSpan(tag, "", began, began, ended, ended))
        return sampler_id

    def sampler(self, sampler_id: str, user: User) -> SamplerState:
        state = self.samplers.get(sampler_id)
        if state is None or not user.owns(state.owner):
            raise NotFound(self._gone_sampler_message(sampler_id, user))
        return state

    def _gone_sampler_message(self, sampler_id: str, user: User) -> str:
        """Why a sampler is not live: unknown, or (to its owner) how its session ended."""
        with self.db() as s:
            found = s.execute(select(SessionRow.owner, SessionRow.status).join(SamplerRow, SamplerRow.session_id == SessionRow.id)
                              .where(SamplerRow.id == sampler_id)).first()
        if found is None or not user.owns(found[0]) or found[1] == "active":
            return f"unknown sampling session {sampler_id!r} (never created, or its session ended)"
        why = ("the server restarted, or its client stopped sending heartbeats" if found[1] == "expired"
               else "its client finished the session")
        return (f"sampling session {sampler_id!r} has ended: {why}, and its requests in flight ended with it; "
                "create a new sampling client")

    def get_sampler(self, sampler_id: str, user: User) -> SamplerRow:
        """A sampler's record, for its session's owner."""
        with self.db() as s:
            found = s.execute(select(SamplerRow, SessionRow.owner).join(SessionRow, SessionRow.id == SamplerRow.session_id,
                                                                        isouter=True).where(SamplerRow.id == sampler_id)).first()
        if found is None or not user.owns(found[1]):
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return found[0]

    def sample(self, sampler_id: str, seq_id: int | None, request: SampleRequest, user: User) -> tuple[FutureEntry, list[str]]:
        """A Tinker sample request: checked (a failed check fails its future, as a `user`
        failure naming the field), submitted, and its samples recorded for StableReinforce
        when asked."""
        state = self.sampler(sampler_id, user)
        self._touch(state.session_id)
        if seq_id is not None and seq_id in state.seen:
            earlier, earlier_ids = state.seen[seq_id]
            if (earlier_entry := earlier()) is not None:
                return earlier_entry, earlier_ids
        self.work.admit(user)
        entry = self.futures.create("sample", state.session_id, owner=user.name)
        entry.trace = trace = TraceTag(sampler_id, "sample", seq_id, {"prompt_tokens": len(request.prompt),
                                                                      "num_samples": request.num_samples})
        try:
            request = sampling.check(state.target.info, request)
            trace.args["max_tokens"] = request.params.max_tokens
            failure = None
        except UserError as exc:
            failure = Failure(tinker_sampling_message(exc), "user")
        # Checked first: num_samples is bounded only once the check passed.
        sequence_ids = [f"{entry.request_id}:{i}" for i in range(request.num_samples)] if failure is None else []
        if seq_id is not None:
            state.seen[seq_id] = (weakref.ref(entry), sequence_ids)
            if len(state.seen) > _SEEN_WINDOW:
                del state.seen[min(state.seen)]
        if failure is not None:
            self.futures.resolve(entry, failure=failure)
            return entry, sequence_ids
        session_id, record_stability = state.session_id, request.record_stability_info
        prompt = list(request.prompt) if record_stability else []

        def on_done(result: SampleResult) -> SampleResult:
            trace.args["sampled_tokens"] = sum(len(seq.tokens) for seq in result.sequences)
            if record_stability:
                for sequence_id, seq in zip(sequence_ids, result.sequences, strict=True):
                    self.stability.record(sequence_id, SequenceRecord(session_id, prompt, list(seq.tokens), list(seq.logprobs)))
            return result

        self._chain(self.sampling.submit(state.target, request), entry, on_done)
        return entry, sequence_ids

    # -- listing -----------------------------------------------------------------------------

    def readable_checkpoints(self, user: User) -> list[CheckpointRow]:
        """Every checkpoint `user` may read: their own and the published ones."""
        return self.registry.list_checkpoints(user, access_scope="accessible")[0]


_TINKER_FIELDS = {"temperature", "top_p", "top_k", "stop", "max_tokens", "seed"}


def tinker_sampling_message(exc: UserError) -> str:
    """A sampling check's message in the Tinker SDK's field names (`sampling_params.top_p`)."""
    if exc.field is None or exc.field == "prompt":
        return str(exc)
    name = f"sampling_params.{exc.field}" if exc.field in _TINKER_FIELDS else exc.field
    return f"{name}: {exc}"
