"""Queries and management of the durable records: training runs, checkpoints, sessions.

This is what the REST routes of the RestClient and the `tinker` CLI read and change
(listing, publish, TTL, delete, download URLs), each on behalf of a user and within what
that user may see and change (core/access.py), plus the file-level guarantees that make
checkpoints safe across crashes: integrity checks before a load, and a startup sweep of
files that no acknowledged checkpoint points at. It only needs the database and the data
dir, so offline commands (`tinkerd import-adapter`, `tinkerd export`) use it too.
No torch here.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import hmac
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from tinkerd.core import audit
from tinkerd.core.access import (
    NotPermitted,
    User,
    checkpoints_owned_by,
    checkpoints_readable_by,
    runs_of_readers,
    runs_owned_by,
    runs_readable_by,
)
from tinkerd.core.db import CheckpointRow, MetricRow, RunRow, SamplerRow, SessionRow, aware, utcnow
from tinkerd.core.paths import CHECKPOINT_KINDS, TinkerPath
from tinkerd.core.secret_file import read_or_create_secret
from tinkerd.types import NotFound, UserError

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # the SDK documents "up to 10 years"
DOWNLOAD_URL_LIFETIME = dt.timedelta(hours=1)
SIGNING_KEY_FILE = "url-signing.key"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class Forbidden(Exception):
    """A download URL whose signature is wrong or whose time is up (HTTP 403)."""


@dataclass
class RunSummary:
    run: RunRow
    last_checkpoint: CheckpointRow | None
    last_sampler_checkpoint: CheckpointRow | None


@dataclass
class CheckpointSearch:
    """What a checkpoint search matches: every given filter must hold."""

    owner: str = "own"  # "own": the caller's; "accessible" (or "user", with owner_names): all they may read
    owner_names: list[str] | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    kind: str | None = None  # weights | sampler_weights | external_weights
    base_models: list[str] | None = None
    limit: int = 50
    after: tuple[dt.datetime, int] | None = None  # (created_at, id) of the previous page's last


def tinker_path_of(row: CheckpointRow) -> str:
    return f"tinker://{row.run_id}/{row.kind}/{row.name}"


def public_metadata(metadata: dict | None) -> dict[str, str]:
    """User metadata as the SDK types it (str → str), without our internal `_` keys."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if not str(k).startswith("_")}


# -- file integrity ------------------------------------------------------------------------


def _check_safetensors(file: Path) -> None:
    """Cheap structural check by the safetensors library itself: the header parses and its
    tensors cover the file exactly (a truncated or padded file fails). Reads no tensor data."""
    try:
        with safe_open(str(file), framework="numpy") as handle:
            handle.keys()
    except SafetensorError as exc:
        raise ValueError(f"{file.name}: {exc}") from None


def check_checkpoint_files(directory: Path, tinker_path: str, with_optimizer: bool = False) -> None:
    """Raise NotFound (files gone) or UserError (files damaged) naming the checkpoint.

    Called before a checkpoint is loaded, so a bad file gives one clear error for that
    request and nothing else is affected.
    """
    needed = [CONFIG_FILE, ADAPTER_FILE] + ([OPTIMIZER_FILE] if with_optimizer else [])
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise NotFound(f"checkpoint {tinker_path} is listed but its files are missing ({', '.join(missing)}); it cannot be loaded")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if not isinstance(config, dict) or "r" not in config or "lora_alpha" not in config:
            raise ValueError(f"{CONFIG_FILE} has no r / lora_alpha")
        for name in needed[1:]:
            _check_safetensors(directory / name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {tinker_path} is damaged and cannot be loaded: {exc}") from None


def disk_full_message(exc: BaseException) -> str | None:
    """A clear message when `exc` means the disk (or a quota / file size limit) is full."""
    codes = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in codes) or any(
        marker in text for marker in ("No space left", "StorageFull", "FileTooLarge", "File too large", "QuotaExceeded", "disk is full")
    ):
        return f"not enough disk space on the server to write the checkpoint; nothing was saved ({type(exc).__name__}: {text})"
    return None


def checkpoint_query(path: TinkerPath) -> Select:
    """The one query for a checkpoint by its path (at most one row: run, kind and name are unique)."""
    return select(CheckpointRow).where(
        CheckpointRow.run_id == path.run_id, CheckpointRow.kind == path.kind, CheckpointRow.name == path.name
    )


ACCESS_SCOPES = ("owned", "accessible")


def find_checkpoint(s: Session, path: TinkerPath, user: User, change: bool = False) -> CheckpointRow:
    """The checkpoint at `path` in session `s` if `user` may read it (and, with `change`,
    change it); NotFound when they may not read it, as if it did not exist."""
    found = s.execute(checkpoint_query(path).join(RunRow, RunRow.id == CheckpointRow.run_id, isouter=True)
                      .add_columns(RunRow.owner, RunRow.project_id)).first()
    if found is None:
        raise NotFound(f"checkpoint {path} does not exist")
    row, owner, project_id = found
    if not user.owns(owner):
        if not (row.public or user.reads_project(project_id)):
            raise NotFound(f"checkpoint {path} does not exist")
        if change:
            shared = "published" if row.public else f"shared in project {project_id!r}"
            raise NotPermitted(f"checkpoint {path} is {shared} by another user: only its owner may change it")
    return row


def check_scope(access_scope: str) -> str:
    if access_scope not in ACCESS_SCOPES:
        raise UserError(f"access_scope must be 'owned' or 'accessible', got {access_scope!r}")
    return access_scope


# -- the registry --------------------------------------------------------------------------


class Registry:
    def __init__(self, db: sessionmaker, data_dir: Path):
        self.db = db
        self.data_dir = data_dir

    # -- runs ------------------------------------------------------------------------------

    def _summaries(self, runs: list[RunRow], user: User) -> list[RunSummary]:
        """Each run with its newest checkpoints of each kind among those `user` may read."""
        if not runs:
            return []
        latest: dict[tuple[str, str], CheckpointRow] = {}
        with self.db() as s:
            q = (
                select(CheckpointRow)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(CheckpointRow.run_id.in_([r.id for r in runs]), CheckpointRow.kind.in_(["weights", "sampler_weights"]),
                       checkpoints_readable_by(user))
                .order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc())
            )
            for row in s.scalars(q):
                latest.setdefault((row.run_id, row.kind), row)
        return [RunSummary(r, latest.get((r.id, "weights")), latest.get((r.id, "sampler_weights"))) for r in runs]

    def list_runs(self, user: User, limit: int, offset: int, base_model: str | None = None, search: str | None = None,
                  access_scope: str = "owned", project_id: str | None = None) -> tuple[list[RunSummary], int]:
        """Newest first: `user`'s own runs ("owned"), or every run they may see ("accessible");
        optionally only one project's runs, one base model's, or runs whose id or base model
        contains `search`."""
        q = select(RunRow).where(runs_owned_by(user) if check_scope(access_scope) == "owned" else runs_readable_by(user))
        if project_id is not None:
            q = q.where(RunRow.project_id == project_id)
        if base_model:
            q = q.where(RunRow.base_model == base_model)
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            # ilike: case-insensitive on Postgres too, as LIKE always was on SQLite
            q = q.where(RunRow.id.ilike(pattern, escape="\\") | RunRow.base_model.ilike(pattern, escape="\\"))
        with self.db() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            runs = list(s.scalars(q.order_by(RunRow.created_at.desc(), RunRow.id.desc()).offset(offset).limit(limit)))
        return self._summaries(runs, user), total

    def run_progress(self, run_ids: list[str]) -> dict[str, tuple[int, float | None]]:
        """Per run: optimizer steps taken, and the last loss a forward pass reported (None before any)."""
        if not run_ids:
            return {}
        with self.db() as s:
            steps = dict(
                s.execute(
                    select(MetricRow.run_id, func.count(func.distinct(MetricRow.seq_id)))
                    .where(MetricRow.run_id.in_(run_ids), MetricRow.kind == "optim_step")
                    .group_by(MetricRow.run_id)
                ).all()
            )
            last_loss_id = (
                select(MetricRow.run_id, func.max(MetricRow.id).label("id"))
                .where(MetricRow.run_id.in_(run_ids), MetricRow.kind.in_(["forward_backward", "forward"]), MetricRow.key.like("loss%"))
                .group_by(MetricRow.run_id)
                .subquery()
            )
            losses = dict(s.execute(select(MetricRow.run_id, MetricRow.value).join(last_loss_id, MetricRow.id == last_loss_id.c.id)).all())
        return {run_id: (steps.get(run_id, 0), losses.get(run_id)) for run_id in run_ids}

    def run_row(self, run_id: str, user: User) -> RunRow:
        """The run if `user` owns it (or is an admin); NotFound otherwise."""
        with self.db() as s:
            row = s.get(RunRow, run_id)
        if row is None or not user.owns(row.owner):
            raise NotFound(f"unknown training run {run_id!r}")
        return row

    def readable_run(self, run_id: str, user: User) -> RunRow:
        """The run if `user` may see it: their own, or one with a published checkpoint."""
        with self.db() as s:
            row = s.scalar(select(RunRow).where(RunRow.id == run_id, runs_readable_by(user)))
        if row is None:
            raise NotFound(f"unknown training run {run_id!r}")
        return row

    def run(self, run_id: str, user: User) -> RunSummary:
        return self._summaries([self.readable_run(run_id, user)], user)[0]

    def metric_history(self, run_id: str, user: User, after_id: int = 0) -> list[MetricRow]:
        """The run's metrics in the order they were reported; only those recorded after the
        metric `after_id` when given (so a live chart fetches each point once). Only for the
        run's owner and its project's members: publishing a checkpoint shares the checkpoint,
        not how it was trained."""
        with self.db() as s:
            if s.scalar(select(RunRow.id).where(RunRow.id == run_id, runs_of_readers(user))) is None:
                raise NotFound(f"unknown training run {run_id!r}")
        with self.db() as s:
            q = select(MetricRow).where(MetricRow.run_id == run_id, MetricRow.id > after_id).order_by(MetricRow.id)
            return list(s.scalars(q))

    # -- checkpoints -----------------------------------------------------------------------

    def list_checkpoints(self, user: User, run_id: str | None = None, limit: int | None = None, offset: int = 0,
                         access_scope: str = "owned") -> tuple[list[CheckpointRow], int]:
        """Newest first, among those `user` may read: one run's, or, across runs, the user's own
        ("owned") or every one they may read ("accessible": published ones too)."""
        if run_id is not None:
            self.readable_run(run_id, user)
            visible = checkpoints_readable_by(user)
        else:
            visible = checkpoints_owned_by(user) if check_scope(access_scope) == "owned" else checkpoints_readable_by(user)
        with self.db() as s:
            q = select(CheckpointRow).join(RunRow, RunRow.id == CheckpointRow.run_id).where(visible)
            count = select(func.count()).select_from(CheckpointRow).join(RunRow, RunRow.id == CheckpointRow.run_id).where(visible)
            if run_id is not None:
                q = q.where(CheckpointRow.run_id == run_id)
                count = count.where(CheckpointRow.run_id == run_id)
            q = q.order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc()).offset(offset)
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q)), s.scalar(count) or 0

    def checkpoint(self, path: TinkerPath, user: User) -> CheckpointRow:
        """The checkpoint if `user` may read it, else NotFound."""
        with self.db() as s:
            return find_checkpoint(s, path, user)

    def delete_checkpoint(self, path: TinkerPath, user: User) -> None:
        """Forget the checkpoint, then free its files (a crash in between leaves only an orphan dir)."""
        with self.db.begin() as s:
            row = find_checkpoint(s, path, user, change=True)
            directory = row.directory
            audit.record(s, "delete", row, user.name)
            s.delete(row)
        shutil.rmtree(directory, ignore_errors=True)

    def set_public(self, path: TinkerPath, public: bool, user: User) -> None:
        # Idempotent: production answers 409 when nothing changes, but the SDK retries 409
        # for five minutes before it gives up, which looks like a hang.
        with self.db.begin() as s:
            row = find_checkpoint(s, path, user, change=True)
            if bool(row.public) != public:  # only a change is an event
                audit.record(s, "publish" if public else "unpublish", row, user.name)
            row.public = public

    def set_ttl(self, path: TinkerPath, ttl_seconds: int | None, user: User) -> dt.datetime | None:
        """Expire `ttl_seconds` from now (None: never). The janitor deletes expired checkpoints."""
        if ttl_seconds is not None:
            if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
                raise UserError(f"ttl_seconds must be an integer number of seconds or null, got {ttl_seconds!r}")
            if not (1 <= ttl_seconds <= MAX_TTL_SECONDS):
                raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (10 years), got {ttl_seconds}")
        expires = utcnow() + dt.timedelta(seconds=ttl_seconds) if ttl_seconds is not None else None
        with self.db.begin() as s:
            find_checkpoint(s, path, user, change=True).expires_at = expires
        return expires

    def weights_info(self, tinker_path: str, user: User) -> tuple[RunRow, CheckpointRow]:
        path = TinkerPath.parse(tinker_path)
        row = self.checkpoint(path, user)
        return self.readable_run(row.run_id, user), row

    def base_models_of(self, run_ids: list[str]) -> dict[str, str]:
        """{run id: its base model}, for the `base_model` of each checkpoint listed."""
        if not run_ids:
            return {}
        with self.db() as s:
            return dict(s.execute(select(RunRow.id, RunRow.base_model).where(RunRow.id.in_(sorted(set(run_ids))))).all())

    def search_checkpoints(self, user: User, search: CheckpointSearch) -> tuple[list[CheckpointRow], tuple[dt.datetime, int] | None]:
        """One page, newest first, of the checkpoints `user` may read that match `search`, and
        where the next page starts (None after the last)."""
        if search.owner == "own":
            visible = checkpoints_owned_by(user)
        else:
            visible = checkpoints_readable_by(user)
        q = select(CheckpointRow).join(RunRow, RunRow.id == CheckpointRow.run_id).where(visible)
        if search.owner_names is not None:
            q = q.where(RunRow.owner.in_(search.owner_names))
        if search.project_ids is not None:
            hidden = [p for p in search.project_ids if not user.reads_project(p)]
            if hidden:
                raise NotFound(f"unknown project {hidden[0]!r}")
            q = q.where(RunRow.project_id.in_(search.project_ids))
        if search.kind is not None:
            q = q.where(CheckpointRow.kind == search.kind)
        if search.base_models is not None:
            q = q.where(RunRow.base_model.in_(search.base_models))
        for key, value in sorted(search.user_metadata.items()):
            q = q.where(CheckpointRow.user_metadata[key].as_string() == value)
        if search.after is not None:
            created, row_id = search.after
            q = q.where((CheckpointRow.created_at < created) | ((CheckpointRow.created_at == created) & (CheckpointRow.id < row_id)))
        q = q.order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc()).limit(search.limit + 1)
        with self.db() as s:
            rows = list(s.scalars(q))
        if len(rows) <= search.limit:
            return rows, None
        rows = rows[: search.limit]
        return rows, (aware(rows[-1].created_at), rows[-1].id)

    # -- sessions --------------------------------------------------------------------------

    def list_sessions(self, user: User, limit: int, offset: int, access_scope: str = "owned") -> list[SessionRow]:
        """The user's own sessions, newest first; with "accessible", an admin's list has everyone's."""
        q = select(SessionRow)
        if check_scope(access_scope) == "owned" or not user.admin:
            q = q.where(SessionRow.owner == user.name)
        with self.db() as s:
            return list(s.scalars(q.order_by(SessionRow.created_at.desc(), SessionRow.id.desc()).offset(offset).limit(limit)))

    def session(self, session_id: str, user: User) -> tuple[SessionRow, list[str], list[str]]:
        """(session, its training run ids, its sampler ids), oldest first; only for its owner."""
        with self.db() as s:
            row = s.get(SessionRow, session_id)
            if row is None or not user.owns(row.owner):
                raise NotFound(f"unknown session {session_id!r}")
            runs = list(s.scalars(select(RunRow.id).where(RunRow.session_id == session_id).order_by(RunRow.created_at, RunRow.id)))
            samplers = list(
                s.scalars(select(SamplerRow.id).where(SamplerRow.session_id == session_id).order_by(SamplerRow.created_at, SamplerRow.id))
            )
        return row, runs, samplers

    # -- signed download URLs --------------------------------------------------------------

    def _signing_key(self) -> bytes:
        """A random secret per data dir, created once (0600), so URLs survive restarts."""
        return read_or_create_secret(self.data_dir / SIGNING_KEY_FILE)

    def _signature(self, payload: str) -> str:
        digest = hmac.new(self._signing_key(), payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _sign(self, claims: dict) -> str:
        """A token that carries `claims` (each kind of token has its own claim key, so one
        kind never passes for another), signed with the data dir's key."""
        payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{payload}.{self._signature(payload)}"

    def _open(self, token: str, what: str, expired: str, now: dt.datetime | None,
              *fields: tuple[str, type]) -> list:
        """The `fields` (claim key, conversion) of a token `_sign` made and that has not expired;
        else Forbidden, naming `what` the token is for or saying `expired`."""
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature, self._signature(payload)):
            raise Forbidden(f"invalid {what} signature")
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            values = [convert(claims[key]) for key, convert in fields]
            expires = int(claims["e"])
        except (ValueError, KeyError, TypeError):
            raise Forbidden(f"malformed {what} token") from None
        if (now or utcnow()).timestamp() > expires:
            raise Forbidden(expired)
        return values

    def sign_download(self, row: CheckpointRow, file_name: str, expires: dt.datetime) -> str:
        """A token for one file of one checkpoint version, valid until `expires`."""
        return self._sign({"c": row.id, "f": file_name, "e": int(expires.timestamp())})

    def download_urls(self, path: TinkerPath, base_url: str, user: User,
                      now: dt.datetime | None = None) -> tuple[dict[str, str], dt.datetime]:
        """{relative file name: signed URL} for every file of an external_weights or sampler_weights
        checkpoint (both are PEFT adapters; a weights/ checkpoint also holds optimizer state).
        Only for a user who may read it: the URLs themselves need no key."""
        if path.kind not in ("external_weights", "sampler_weights"):
            raise UserError(
                f"{path} is not an external_weights checkpoint: save one with TrainingClient.save_weights_external "
                "(or use `tinker checkpoint download` for weights/ paths)"
            )
        row = self.checkpoint(path, user)
        directory = Path(row.directory)
        if not directory.is_dir():
            raise NotFound(f"checkpoint {path} is listed but its files are missing")
        expires = (now or utcnow()) + DOWNLOAD_URL_LIFETIME
        files = sorted(f.name for f in directory.iterdir() if f.is_file() and not f.name.startswith("."))
        return {name: f"{base_url}?token={self.sign_download(row, name, expires)}" for name in files}, expires

    def open_download(self, token: str, now: dt.datetime | None = None) -> Path:
        """The file a token grants, or Forbidden / NotFound."""
        row_id, file_name = self._open(token, "download", "this download URL has expired; ask for new URLs "
                                       "(get_external_weights_urls)", now, ("c", int), ("f", str))
        with self.db() as s:
            row = s.get(CheckpointRow, row_id)
        if row is None:
            raise NotFound("the checkpoint of this download URL was deleted")
        file = Path(row.directory) / file_name
        if "/" in file_name or file_name.startswith(".") or not file.is_file():
            raise NotFound(f"{file_name} is not a file of {tinker_path_of(row)}")
        return file

    def archive_url(self, path: TinkerPath, base_url: str, user: User,
                    now: dt.datetime | None = None) -> tuple[str, dt.datetime]:
        """A signed URL of one tar of a checkpoint's files, any kind (SDK 0.34 / 0.35's
        get_checkpoint_archive_url and their `tinker checkpoint download`). Only for a user who
        may read it; the "a" claim keeps the token apart from the per-file download tokens."""
        row = self.checkpoint(path, user)
        if not Path(row.directory).is_dir():
            raise NotFound(f"checkpoint {path} is listed but its files are missing")
        expires = (now or utcnow()) + DOWNLOAD_URL_LIFETIME
        return f"{base_url}?token={self._sign({'a': row.id, 'e': int(expires.timestamp())})}", expires

    def open_archive(self, token: str, now: dt.datetime | None = None) -> CheckpointRow:
        """The checkpoint an archive token grants, or Forbidden / NotFound."""
        (row_id,) = self._open(token, "archive", "this archive URL has expired; ask for a new one "
                               "(get_checkpoint_archive_url)", now, ("a", int))
        with self.db() as s:
            row = s.get(CheckpointRow, row_id)
        if row is None or not Path(row.directory).is_dir():
            raise NotFound("the checkpoint of this archive URL was deleted")
        return row

    def sign_upload(self, upload_id: str, file_name: str, expires: dt.datetime) -> str:
        """A token to PUT one file of one weights upload, valid until `expires` (same key as downloads;
        the "u" claim keeps the two kinds of token apart)."""
        return self._sign({"u": upload_id, "f": file_name, "e": int(expires.timestamp())})

    def open_upload(self, token: str, now: dt.datetime | None = None) -> tuple[str, str]:
        """(upload id, file name) a token lets its bearer PUT, or Forbidden."""
        upload_id, file_name = self._open(token, "upload", "this upload URL has expired; start a new upload", now,
                                          ("u", str), ("f", str))
        return upload_id, file_name

    def sign_trace(self, session_id: str, expires: dt.datetime) -> str:
        """A token to download one session's trace, valid until `expires` (same key as downloads;
        the "s" claim keeps it apart from the other kinds of token)."""
        return self._sign({"s": session_id, "e": int(expires.timestamp())})

    def open_trace(self, token: str, now: dt.datetime | None = None) -> str:
        """The session whose trace a token lets its bearer download, or Forbidden."""
        (session_id,) = self._open(token, "trace download", "this trace URL has expired; run `tinker session "
                                   "export-trace` again", now, ("s", str))
        return session_id

    # -- crash recovery --------------------------------------------------------------------

    def remove_orphan_files(self) -> list[Path]:
        """Delete checkpoint dirs that no row points at, and ephemeral sampler snapshots.

        A checkpoint is acknowledged only after its row commits, and the row only points at
        a fully written directory, so anything else under checkpoints/ was written by a
        save that crashed before it was acknowledged (or freed by a delete that crashed).
        Only call this while no save can be running (at startup).
        """
        root = self.data_dir / "checkpoints"
        with self.db() as s:
            referenced = {Path(d).resolve() for d in s.scalars(select(CheckpointRow.directory))}
        removed: list[Path] = []
        if root.is_dir():
            for run_dir in root.iterdir():
                for kind_dir in run_dir.iterdir() if run_dir.is_dir() else []:
                    for ckpt_dir in kind_dir.iterdir() if kind_dir.is_dir() else []:
                        if ckpt_dir.resolve() not in referenced:
                            shutil.rmtree(ckpt_dir, ignore_errors=True)
                            removed.append(ckpt_dir)
        ephemeral = self.data_dir / "ephemeral"
        if ephemeral.is_dir():  # save_weights_and_get_sampling_client snapshots die with their process
            shutil.rmtree(ephemeral, ignore_errors=True)
        return removed

    def checkpoint_usage(self) -> dict[str, tuple[int, int]]:
        """Checkpoints by kind ("weights", "sampler_weights"): (how many, bytes on disk)."""
        with self.db() as s:
            rows = s.execute(select(CheckpointRow.kind, func.count(), func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
                             .group_by(CheckpointRow.kind)).all()
        return {kind: (int(count), int(size)) for kind, count, size in rows}


def checkpoint_kind_label(kind: str) -> str:
    return CHECKPOINT_KINDS[kind]


def iso(value: dt.datetime | None) -> str | None:
    """Timezone-aware ISO-8601 (the CLI compares these with aware datetimes)."""
    return aware(value).isoformat() if value is not None else None

