"""copy_weights: a checkpoint copied into a project, as a new run of the caller's.

The copy is a new training run (in a finished session, so nothing trains on it) holding one
checkpoint of the source's kind and name, owned by the caller and placed in the destination
project. Its files are hard links to the source's where the filesystem allows (no bytes are
duplicated, and deleting either checkpoint leaves the other whole), copies otherwise.

A retried copy (the SDK sends the same `X-Idempotency-Key` on every retry) makes one copy:
the run id is derived from the caller and the key, so the retry finds the run the first
attempt made and answers its path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from tinkerd.core import audit
from tinkerd.core.access import User
from tinkerd.core.db import CheckpointRow, ProjectRow, RunRow, SessionRow, utcnow
from tinkerd.core.paths import TinkerPath
from tinkerd.core.registry import MAX_TTL_SECONDS, tinker_path_of
from tinkerd.types import NotFound, UserError

MAX_IDEMPOTENCY_KEY = 256


def check_ttl(ttl_seconds: object) -> int | None:
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not (3600 <= ttl_seconds <= MAX_TTL_SECONDS):
        raise UserError(f"ttl_seconds must be between 3600 (1 hour) and {MAX_TTL_SECONDS} (10 years), got {ttl_seconds!r}",
                        field="ttl_seconds")
    return ttl_seconds


def copy_run_id(user: User, idempotency_key: str | None) -> str:
    """The copy's run id: the same for the same caller and key, fresh without a key."""
    if idempotency_key is None:
        token = uuid.uuid4().hex[:16]
    else:
        token = hashlib.sha256(f"{user.name}\0{idempotency_key}".encode()).hexdigest()[:16]
    return f"copy-{token}:train:0"


def link_or_copy_tree(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        try:
            os.link(file, destination / file.name)
        except OSError:  # another filesystem, or links not allowed: copy the bytes
            shutil.copy2(file, destination / file.name)


def copy_checkpoint(db: sessionmaker, data_dir: Path, source: CheckpointRow, destination_project_id: str, user: User,
                    ttl_seconds: int | None = None, idempotency_key: str | None = None) -> str:
    """Copy `source` (a checkpoint the caller was found to be allowed to read) into
    `destination_project_id` (a project the caller is a member of); returns the copy's path."""
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
        raise UserError(f"X-Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters", field="X-Idempotency-Key")
    ttl_seconds = check_ttl(ttl_seconds)
    run_id = copy_run_id(user, idempotency_key)
    with db() as s:
        if s.get(ProjectRow, destination_project_id) is None or not user.reads_project(destination_project_id):
            raise NotFound(f"unknown project {destination_project_id!r} (projects are made with `tinkerd projects create`, "
                           "and only their members may use them)", field="destination_project_id")
        done = s.scalar(select(CheckpointRow).where(CheckpointRow.run_id == run_id))
        if done is not None:  # a retry of a copy that went through
            return tinker_path_of(done)
        source_run = s.get(RunRow, source.run_id)
    if source_run is None:
        raise NotFound(f"checkpoint {tinker_path_of(source)} does not exist")
    path = TinkerPath(run_id, source.kind, source.name)
    row_id = uuid.uuid4().hex[:8]
    directory = data_dir / "checkpoints" / run_id / source.kind / f"{source.name}@{row_id}"
    if not Path(source.directory).is_dir():
        raise NotFound(f"checkpoint {tinker_path_of(source)} is listed but its files are missing")
    link_or_copy_tree(Path(source.directory), directory)
    session_id = run_id.split(":", 1)[0]
    origin = {"copied_from": tinker_path_of(source)}
    metadata = {k: v for k, v in (source.user_metadata or {}).items() if not str(k).startswith("_")}
    try:
        with db.begin() as s:  # files first, rows last: the copy exists once this commits
            s.add(SessionRow(id=session_id, status="finished", tags=["copy-weights"], user_metadata=origin, owner=user.name,
                             project_id=destination_project_id))
            s.add(RunRow(id=run_id, session_id=session_id, owner=user.name, base_model=source_run.base_model,
                         lora_rank=source_run.lora_rank, train_attn=source_run.train_attn, train_mlp=source_run.train_mlp,
                         train_unembed=source_run.train_unembed, seed=source_run.seed, user_metadata=origin,
                         project_id=destination_project_id))
            row = CheckpointRow(run_id=run_id, kind=source.kind, name=source.name, directory=str(directory),
                                size_bytes=source.size_bytes, has_optimizer=source.has_optimizer,
                                user_metadata={**metadata, "_cache_key": f"{path}@{row_id}" if source.kind == "sampler_weights" else ""},
                                expires_at=utcnow() + dt.timedelta(seconds=ttl_seconds) if ttl_seconds else None)
            s.add(row)
            s.flush()  # the run must be there for the audit event to name its owner and project
            audit.record(s, "create", row, user.name, size_bytes=source.size_bytes, copied_from=tinker_path_of(source))
    except IntegrityError:  # the same copy, made at the same time by a concurrent retry
        shutil.rmtree(directory, ignore_errors=True)
        with db() as s:
            done = s.scalar(select(CheckpointRow).where(CheckpointRow.run_id == run_id))
        if done is None:
            raise
        return tinker_path_of(done)
    return str(path)
