"""The state that outlives a request: sessions, training runs, checkpoints, samplers.

The API layer calls into `Service` with plain values; `Service` keeps metadata in SQLite,
files under the data dir, orders each model's requests by `seq_id`, and hands tensor
work to the engine of the right base model.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tinkerd.core.db import CheckpointRow, MetricRow, RunRow, SamplerRow, SessionRow, aware, open_database, utcnow
from tinkerd.core.futures import Failure, FutureEntry, FutureStore
from tinkerd.core.provenance import ProvenanceError, SequenceRecord, StabilityStore, check_tiling, stability_for_datum
from tinkerd.engine.engine import Engine
from tinkerd.engine.lora_io import CheckpointFileError
from tinkerd.engine.losses import LossInputError
from tinkerd.engine.types import (
    AdamParams,
    AdapterRef,
    Datum,
    ForwardBackwardCall,
    LoraSpec,
    SampleRequest,
    TrainResult,
    UserInputError,
)

log = logging.getLogger(__name__)

CHECKPOINT_KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME_RE = re.compile(r"^[A-Za-z0-9._\-]{1,200}$")
_SEEN_WINDOW = 4096  # how many past seq_ids per model stay deduplicated


class NotFound(Exception):
    """An unknown id or path (HTTP 404)."""


class BadRequest(Exception):
    """A request that is invalid on its face (HTTP 400)."""


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise BadRequest(f"not a tinker:// path: {path!r}")
        parts = path.removeprefix("tinker://").split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
            raise BadRequest(
                f"malformed tinker path {path!r}: expected tinker://<run>/<weights|sampler_weights|external_weights>/<name>"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


@dataclass
class ModelState:
    run_id: str
    session_id: str
    engine: Engine
    next_seq: int = 1
    pending: dict[int, tuple[Callable[[Engine], Any], FutureEntry, Callable[[Any], Any] | None]] = field(default_factory=dict)
    seen: dict[int, FutureEntry] = field(default_factory=dict)


@dataclass
class SamplerState:
    sampler_id: str
    session_id: str
    base_model: str
    model_path: str | None
    adapter: AdapterRef | None
    seen: dict[int, tuple[FutureEntry, list[str]]] = field(default_factory=dict)


def failure_from_exception(exc: BaseException) -> Failure:
    if isinstance(exc, (UserInputError, LossInputError, CheckpointFileError, BadRequest, NotFound)):
        return Failure(str(exc), "user")
    from tinkerd.core.registry import disk_full_message

    if (message := disk_full_message(exc)) is not None:
        return Failure(message, "server")
    if isinstance(exc, OSError):
        return Failure(f"storage error: {exc}", "server")
    return Failure(f"internal error: {type(exc).__name__}: {exc}", "server")


class Service:
    def __init__(self, data_dir: Path, engines: dict[str, Engine], session_timeout: float = 120.0):
        self.data_dir = data_dir
        self.engines = engines
        self.session_timeout = session_timeout
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_database(data_dir / "tinkerd.sqlite")
        self.futures = FutureStore()
        self.models: dict[str, ModelState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self.session_seen: dict[str, float] = {}
        self.stability = StabilityStore()
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
        from tinkerd.core.registry import Registry

        Registry(self.db, self.data_dir).remove_orphan_files()  # written-but-never-acknowledged dirs, dead ephemeral samplers

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.futures.bind_loop(loop)
        self._janitor = loop.create_task(self._janitor_loop())

    async def stop(self) -> None:
        if self._janitor:
            self._janitor.cancel()

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.session_timeout / 4))
            try:
                self.expire_idle_sessions()
                self.delete_expired_checkpoints()
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
        for model_id in [m for m, st in self.models.items() if st.session_id == session_id]:
            state = self.models.pop(model_id)
            state.engine.submit(state.engine.drop_adapter, model_id)
        for sampler_id in [k for k, st in self.samplers.items() if st.session_id == session_id]:
            del self.samplers[sampler_id]
        self.futures.drop_session(session_id)
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
                s.delete(row)
        for row in rows:  # after the commit: a crash in between leaves an orphan dir, never a listed checkpoint without files
            shutil.rmtree(row.directory, ignore_errors=True)
        return len(rows)

    # -- sessions ----------------------------------------------------------------------------

    def _touch(self, session_id: str) -> None:
        if session_id in self.session_seen:
            self.session_seen[session_id] = asyncio.get_running_loop().time()

    def create_session(self, tags: list[str], user_metadata: dict, owner: str = "local") -> str:
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        with self.db.begin() as s:
            s.add(SessionRow(id=session_id, tags=list(tags), user_metadata=dict(user_metadata), owner=owner))
        self.session_seen[session_id] = asyncio.get_running_loop().time()
        return session_id

    def heartbeat(self, session_id: str) -> bool:
        """False when the session is gone (the SDK then stops heartbeating)."""
        if session_id not in self.session_seen:
            return False
        self._touch(session_id)
        return True

    def finish_session(self, session_id: str) -> None:
        with self.db.begin() as s:
            if s.get(SessionRow, session_id) is None:
                raise NotFound(f"unknown session {session_id!r}")
        self._end_session(session_id, "finished")

    def _require_session(self, session_id: str) -> None:
        if session_id not in self.session_seen:
            raise NotFound(f"unknown or expired session {session_id!r}")
        self._touch(session_id)

    # -- engines -----------------------------------------------------------------------------

    def engine_for(self, base_model: str) -> Engine:
        engine = self.engines.get(base_model)
        if engine is None:
            raise BadRequest(f"unknown base model {base_model!r}; this server serves: {', '.join(self.engines)}")
        return engine

    # -- ordered training requests -----------------------------------------------------------

    def _model(self, model_id: str) -> ModelState:
        state = self.models.get(model_id)
        if state is None:
            raise NotFound(f"unknown model_id {model_id!r} (never created, or its session ended)")
        self._touch(state.session_id)
        return state

    def _dispatch(
        self, engine: Engine, model_id: str, job: Callable[[Engine], Any] | ForwardBackwardCall, entry: FutureEntry,
        on_done: Callable[[Any], Any] | None,
    ) -> None:
        if isinstance(job, ForwardBackwardCall):
            future: Future = engine.submit_forward_backward(job)
        else:
            future = engine.submit_for(model_id, job, engine)

        def _complete(f: Future) -> None:
            try:
                result = f.result()
                if on_done is not None:
                    result = on_done(result)
                self.futures.resolve(entry, result)
            except BaseException as exc:  # noqa: BLE001 - becomes the request's failure
                if not isinstance(exc, (UserInputError, LossInputError, CheckpointFileError, BadRequest, NotFound)):
                    log.exception("request %s failed", entry.request_id)
                self.futures.resolve(entry, failure=failure_from_exception(exc))

        future.add_done_callback(_complete)

    def submit_ordered(
        self,
        model_id: str,
        seq_id: int | None,
        kind: str,
        job: Callable[[Engine], Any] | ForwardBackwardCall,
        on_done: Callable[[Any], Any] | None = None,
    ) -> FutureEntry:
        state = self._model(model_id)
        if seq_id is not None and seq_id in state.seen:
            return state.seen[seq_id]  # a retry: same future, no second execution
        entry = self.futures.create(kind, state.session_id)
        with self.db.begin() as s:
            run = s.get(RunRow, model_id)
            if run is not None:
                run.last_request_time = utcnow()
        if seq_id is None or seq_id < state.next_seq:
            self._dispatch(state.engine, model_id, job, entry, on_done)
            return entry
        state.seen[seq_id] = entry
        state.pending[seq_id] = (job, entry, on_done)
        while state.next_seq in state.pending:
            job_, entry_, on_done_ = state.pending.pop(state.next_seq)
            self._dispatch(state.engine, model_id, job_, entry_, on_done_)
            state.next_seq += 1
        for old in [s for s in state.seen if s < state.next_seq - _SEEN_WINDOW]:
            del state.seen[old]
        return entry

    def skip_seq(self, model_id: str, seq_id: int | None) -> None:
        """Consume a seq_id whose request was refused at submission.

        The SDK numbers every request; if a refused one left a gap, every later request
        of that training client would wait for it forever.
        """
        state = self.models.get(model_id)
        if state is None or seq_id is None or seq_id in state.seen or seq_id < state.next_seq:
            return
        self.submit_ordered(model_id, seq_id, "skipped", lambda engine: None)

    # -- models ------------------------------------------------------------------------------

    def create_model(
        self, session_id: str, model_seq_id: int, base_model: str, spec: LoraSpec, user_metadata: dict
    ) -> tuple[str, FutureEntry]:
        self._require_session(session_id)
        engine = self.engine_for(base_model)
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self.models:
            return model_id, self.models[model_id].seen.get(0) or self.futures.create("create_model", session_id)
        if spec.seed is None:
            spec = LoraSpec(spec.rank, spec.train_attn, spec.train_mlp, spec.train_unembed, int(uuid.uuid4().int % 2**31))
        state = ModelState(run_id=model_id, session_id=session_id, engine=engine)
        self.models[model_id] = state
        entry = self.futures.create("create_model", session_id)
        state.seen[0] = entry

        def on_done(_: Any) -> dict:
            self._record_run(model_id, session_id, base_model, spec, user_metadata)
            return {"model_id": model_id}

        def on_fail_cleanup(f: Future) -> None:
            if f.exception() is not None:
                self.models.pop(model_id, None)

        fut = engine.submit(lambda: engine.create_adapter(model_id, spec))
        fut.add_done_callback(on_fail_cleanup)
        self._chain(fut, entry, on_done)
        return model_id, entry

    def _record_run(self, run_id: str, session_id: str, base_model: str, spec: LoraSpec, user_metadata: dict | None) -> None:
        with self.db.begin() as s:
            s.merge(
                RunRow(
                    id=run_id, session_id=session_id, base_model=base_model, lora_rank=spec.rank,
                    train_attn=spec.train_attn, train_mlp=spec.train_mlp, train_unembed=spec.train_unembed,
                    seed=spec.seed, user_metadata=dict(user_metadata or {}),
                )
            )

    def _chain(self, fut: Future, entry: FutureEntry, on_done: Callable[[Any], Any] | None) -> None:
        def _complete(f: Future) -> None:
            try:
                result = f.result()
                self.futures.resolve(entry, on_done(result) if on_done else result)
            except BaseException as exc:  # noqa: BLE001
                if not isinstance(exc, (UserInputError, LossInputError, CheckpointFileError, BadRequest, NotFound)):
                    log.exception("request %s failed", entry.request_id)
                self.futures.resolve(entry, failure=failure_from_exception(exc))

        fut.add_done_callback(_complete)

    def get_run(self, run_id: str) -> RunRow:
        with self.db() as s:
            row = s.get(RunRow, run_id)
        if row is None:
            raise NotFound(f"unknown training run {run_id!r}")
        return row

    def forward_backward(
        self, model_id: str, seq_id: int, datums: list[Datum], loss_fn: str, config: dict, forward_only: bool
    ) -> FutureEntry:
        state = self._model(model_id)
        try:
            self._attach_provenance(state.session_id, datums, loss_fn)
        except ProvenanceError as exc:
            raise BadRequest(str(exc)) from None

        job = ForwardBackwardCall(model_id, datums, loss_fn, config, forward_only)

        def record(result: TrainResult) -> TrainResult:
            self._record_metrics(model_id, seq_id, "forward" if forward_only else "forward_backward", result.metrics)
            return result

        return self.submit_ordered(model_id, seq_id, "fwdbwd", job, record)

    def _attach_provenance(self, session_id: str, datums: list[Datum], loss_fn: str) -> None:
        for i, d in enumerate(datums):
            if d.model_input_spans is None:
                if loss_fn == "stable_reinforce":
                    raise ProvenanceError(
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

    def optim_step(self, model_id: str, seq_id: int, params: AdamParams) -> FutureEntry:
        def record(metrics: dict[str, float]) -> dict:
            self._record_metrics(model_id, seq_id, "optim_step", {**metrics, "learning_rate:mean": params.learning_rate})
            return {"metrics": metrics}

        return self.submit_ordered(model_id, seq_id, "optim_step", lambda e: e.optim_step(model_id, params), record)

    def _record_metrics(self, run_id: str, seq_id: int, kind: str, metrics: dict[str, float]) -> None:
        with self.db.begin() as s:
            for key, value in metrics.items():
                s.add(MetricRow(run_id=run_id, seq_id=seq_id, kind=kind, key=key, value=float(value)))

    def metric_history(self, run_id: str) -> list[MetricRow]:
        with self.db() as s:
            return list(s.scalars(select(MetricRow).where(MetricRow.run_id == run_id).order_by(MetricRow.id)))

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
    ) -> FutureEntry:
        """save_weights (kind=weights), save_weights_for_sampler (sampler_weights), external."""
        self._model(model_id)  # raises NotFound for an unknown model
        if name is None:
            # save_weights_and_get_sampling_client: an ephemeral, unlisted snapshot.
            if sampler_session is None:
                raise BadRequest("path is required")
            session_id, sampling_seq = sampler_session
            sampler_id = f"{session_id}:sample:{sampling_seq}"
            directory = self.data_dir / "ephemeral" / sampler_id
            key = f"ephemeral:{sampler_id}:{uuid.uuid4().hex[:8]}"
            run = self.get_run(model_id)

            def on_saved(_: int) -> dict:
                self._register_sampler(sampler_id, session_id, run.base_model, None, AdapterRef(key, directory))
                return {"sampling_session_id": sampler_id}

            return self.submit_ordered(
                model_id, seq_id, "save", lambda e: e.save_adapter(model_id, directory, False, sampler_key=key), on_saved
            )
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise BadRequest(f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' (no '/')")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise BadRequest(f"ttl_seconds must be positive, got {ttl_seconds}")
        path = TinkerPath(model_id, kind, name)
        row_id = uuid.uuid4().hex[:8]
        # One directory per saved version: an overwrite never touches the files a listed row points at.
        directory = self.checkpoint_dir(path).with_name(f"{name}@{row_id}")
        if kind == "weights" and not overwrite:
            with self.db() as s:
                exists = s.scalar(select(CheckpointRow).where(CheckpointRow.run_id == model_id, CheckpointRow.kind == kind, CheckpointRow.name == name))
            if exists is not None:
                raise BadRequest(f"checkpoint {path} already exists (pass overwrite=True to replace it)")
        with_optimizer = kind == "weights"
        sampler_key = f"{path}@{row_id}" if kind == "sampler_weights" else None

        def on_saved(size: int) -> dict:
            replaced_dirs: list[str] = []
            expires = utcnow() + dt.timedelta(seconds=ttl_seconds) if ttl_seconds else None
            with self.db.begin() as s:
                old = s.scalar(select(CheckpointRow).where(CheckpointRow.run_id == model_id, CheckpointRow.kind == kind, CheckpointRow.name == name))
                if old is not None:
                    replaced_dirs.append(old.directory)
                    s.delete(old)
                    s.flush()
                s.add(
                    CheckpointRow(
                        run_id=model_id, kind=kind, name=name, directory=str(directory), size_bytes=size,
                        user_metadata={**(user_metadata or {}), "_cache_key": sampler_key or ""},
                        expires_at=expires, has_optimizer=with_optimizer,
                    )
                )
            for old_dir in replaced_dirs:
                if old_dir != str(directory):
                    shutil.rmtree(old_dir, ignore_errors=True)
            result = {"path": str(path)}
            if kind == "external_weights":
                result["size_bytes"] = size
            return result

        return self.submit_ordered(
            model_id, seq_id, "save",
            lambda e: e.save_adapter(model_id, directory, with_optimizer, sampler_key=sampler_key),
            on_saved,
        )

    def find_checkpoint(self, tinker_path: str) -> CheckpointRow:
        path = TinkerPath.parse(tinker_path)
        with self.db() as s:
            row = s.scalar(
                select(CheckpointRow).where(
                    CheckpointRow.run_id == path.run_id, CheckpointRow.kind == path.kind, CheckpointRow.name == path.name
                )
            )
        if row is None:
            raise NotFound(f"checkpoint {tinker_path} does not exist")
        return row

    def load_weights(
        self,
        path: str,
        with_optimizer: bool,
        model_id: str | None = None,
        seq_id: int | None = None,
        session_id: str | None = None,
        model_seq_id: int | None = None,
        user_metadata: dict | None = None,
    ) -> tuple[str, FutureEntry]:
        """Create-via-load (session_id + model_seq_id) or legacy load into an existing model."""
        row = self.find_checkpoint(path)
        if with_optimizer and not row.has_optimizer:
            raise BadRequest(f"{path} has no optimizer state (only save_state checkpoints do)")
        source_run = self.get_run(row.run_id)
        directory = Path(row.directory)
        from tinkerd.core.registry import check_checkpoint_files

        check_checkpoint_files(directory, path, with_optimizer)
        if model_id is not None:
            return model_id, self.submit_ordered(
                model_id, seq_id, "load", lambda e: e.load_adapter(model_id, directory, with_optimizer), lambda _: {"path": path}
            )
        if session_id is None or model_seq_id is None:
            raise BadRequest("load_weights needs model_id, or session_id and model_seq_id")
        self._require_session(session_id)
        engine = self.engine_for(source_run.base_model)
        new_id = f"{session_id}:train:{model_seq_id}"
        if new_id in self.models and 0 in self.models[new_id].seen:
            return new_id, self.models[new_id].seen[0]
        state = ModelState(run_id=new_id, session_id=session_id, engine=engine)
        self.models[new_id] = state
        entry = self.futures.create("load", session_id)
        state.seen[0] = entry

        def on_done(spec: LoraSpec) -> dict:
            self._record_run(new_id, session_id, source_run.base_model, spec, user_metadata or source_run.user_metadata)
            return {"path": path, "model_id": new_id}

        fut = engine.submit(lambda: engine.load_adapter(new_id, directory, with_optimizer))
        fut.add_done_callback(lambda f: f.exception() is not None and self.models.pop(new_id, None))
        self._chain(fut, entry, on_done)
        return new_id, entry

    # -- sampling ----------------------------------------------------------------------------

    def _register_sampler(
        self, sampler_id: str, session_id: str, base_model: str, model_path: str | None, adapter: AdapterRef | None
    ) -> None:
        self.samplers[sampler_id] = SamplerState(sampler_id, session_id, base_model, model_path, adapter)
        with self.db.begin() as s:
            s.merge(SamplerRow(id=sampler_id, session_id=session_id, base_model=base_model, model_path=model_path))

    def adapter_for_path(self, model_path: str) -> tuple[str, AdapterRef]:
        """(base model, adapter ref) for a checkpoint path; raises NotFound/BadRequest."""
        row = self.find_checkpoint(model_path)
        from tinkerd.core.registry import check_checkpoint_files

        check_checkpoint_files(Path(row.directory), model_path)  # NotFound / BadRequest naming the path
        run = self.get_run(row.run_id)
        key = (row.user_metadata or {}).get("_cache_key") or f"{model_path}@{row.id}"
        return run.base_model, AdapterRef(key=key, directory=Path(row.directory))

    def create_sampling_session(
        self, session_id: str, sampling_seq: int, base_model: str | None, model_path: str | None
    ) -> str:
        self._require_session(session_id)
        adapter = None
        if model_path:
            base_model, adapter = self.adapter_for_path(model_path)
        elif base_model:
            self.engine_for(base_model)
        else:
            raise BadRequest("create_sampling_session needs base_model or model_path")
        sampler_id = f"{session_id}:sample:{sampling_seq}"
        self._register_sampler(sampler_id, session_id, base_model, model_path, adapter)
        return sampler_id

    def get_sampler(self, sampler_id: str) -> SamplerRow:
        with self.db() as s:
            row = s.get(SamplerRow, sampler_id)
        if row is None:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return row

    def sample(self, sampler_id: str, seq_id: int | None, request: SampleRequest) -> tuple[FutureEntry, list[str]]:
        state = self.samplers.get(sampler_id)
        if state is None:
            raise NotFound(f"unknown sampling session {sampler_id!r} (never created, or its session ended)")
        self._touch(state.session_id)
        if seq_id is not None and seq_id in state.seen:
            return state.seen[seq_id]
        engine = self.engine_for(state.base_model)
        request.adapter = state.adapter
        entry = self.futures.create("sample", state.session_id)
        sequence_ids = [f"{entry.request_id}:{i}" for i in range(request.num_samples)]
        on_done = None
        if request.record_stability_info:
            session_id, prompt = state.session_id, list(request.prompt)

            def on_done(result):
                for sequence_id, seq in zip(sequence_ids, result.sequences, strict=True):
                    self.stability.record(sequence_id, SequenceRecord(session_id, prompt, list(seq.tokens), list(seq.logprobs)))
                return result

        self._chain(engine.sample(request), entry, on_done)
        if seq_id is not None:
            state.seen[seq_id] = (entry, sequence_ids)
            if len(state.seen) > _SEEN_WINDOW:
                del state.seen[min(state.seen)]
        return entry, sequence_ids

    # -- listing -----------------------------------------------------------------------------

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointRow]:
        with self.db() as s:
            q = select(CheckpointRow).order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
            if run_id is not None:
                q = q.where(CheckpointRow.run_id == run_id)
            return list(s.scalars(q))
