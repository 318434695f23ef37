"""Durable metadata: sessions, training runs, checkpoints, samplers, metric history, API keys.

SQLAlchemy over SQLite (a file in the data dir, the default) or Postgres (`--database-url`,
for a shared deployment). Every write commits before the request that caused it is
acknowledged. The models here are the schema as the newest migration leaves it
(core/migrations/): a change to them comes with a new revision there (docs/database.md).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tinkerd.types import UserError


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True)}


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String, default="active")  # active | finished | expired
    tags: Mapped[list] = mapped_column(JSON, default=list)
    user_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    owner: Mapped[str] = mapped_column(String, default="local")
    project_id: Mapped[str | None] = mapped_column(String, nullable=True, default=None)  # ProjectRow.id


class RunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[str] = mapped_column(String, primary_key=True)  # == model_id
    session_id: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    lora_rank: Mapped[int] = mapped_column(Integer)
    train_attn: Mapped[bool] = mapped_column(Boolean, default=True)
    train_mlp: Mapped[bool] = mapped_column(Boolean, default=True)
    train_unembed: Mapped[bool] = mapped_column(Boolean, default=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    user_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_request_time: Mapped[dt.datetime] = mapped_column(default=utcnow)
    corrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[str] = mapped_column(String, default="local")
    project_id: Mapped[str | None] = mapped_column(String, index=True, nullable=True, default=None)  # its session's


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "kind", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String, index=True)
    kind: Mapped[str] = mapped_column(String)  # weights | sampler_weights | external_weights
    name: Mapped[str] = mapped_column(String)
    directory: Mapped[str] = mapped_column(String)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # 64-bit: a checkpoint may pass 2 GiB
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict] = mapped_column(JSON, default=dict)
    expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True, default=None)
    has_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)


class SamplerRow(Base):
    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    session_id: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    model_path: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class MetricRow(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String, index=True)
    seq_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String)  # forward_backward | forward | optim_step
    key: Mapped[str] = mapped_column(String)
    value: Mapped[float] = mapped_column(Float)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ProjectRow(Base):
    """A project (`tinkerd projects create`): its members read every run and checkpoint in it."""

    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String, primary_key=True)  # the name it was created with
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ProjectMemberRow(Base):
    __tablename__ = "project_members"
    project_id: Mapped[str] = mapped_column(String, primary_key=True)
    user: Mapped[str] = mapped_column(String, primary_key=True, index=True)  # ApiKeyRow.name


class AuditEventRow(Base):
    """One event of the audit log (core/audit.py): a checkpoint created, published,
    unpublished, deleted or expired."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String)  # checkpoint_create | _publish | _unpublish | _delete | _expire
    actor: Mapped[str] = mapped_column(String)  # the user who did it; "(system)" for the janitor
    owner: Mapped[str] = mapped_column(String)  # the checkpoint's owner
    project_id: Mapped[str | None] = mapped_column(String, nullable=True, default=None)
    tinker_path: Mapped[str] = mapped_column(String)
    details: Mapped[dict] = mapped_column(JSON, default=dict)


class ApiKeyRow(Base):
    """One key of one user (`tinkerd keys create`): only its hash is stored (core/keys.py)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String, index=True)  # the user; owner of what the key creates
    key_hash: Mapped[str] = mapped_column(String, unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(nullable=True, default=None)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True, default=None)


DATABASE_FILE = "tinkerd.sqlite"
POSTGRES_DRIVER = "postgresql+psycopg"


class DatabaseError(Exception):
    """The database cannot be opened (bad URL, missing driver, unreachable server, a schema
    from a newer tinkerd); the message says which, without the password."""


def default_database_url(data_dir: Path) -> str:
    """The SQLite file in the data dir: what every tinkerd used before --database-url."""
    return f"sqlite:///{data_dir / DATABASE_FILE}"


def parse_database_url(url: str | Path) -> URL:
    """A SQLAlchemy URL (a Path means a SQLite file). `postgresql://` and `postgres://`
    without a driver mean psycopg (3), the one Postgres driver tinkerd installs."""
    if isinstance(url, Path):
        url = f"sqlite:///{url}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"invalid database URL {url!r}: expected e.g. sqlite:////path/tinkerd.sqlite or "
                            "postgresql://user:password@host:5432/dbname") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    return parsed


def shown(url: str | Path | URL) -> str:
    """The URL as logs and messages may show it: no password."""
    return (url if isinstance(url, URL) else parse_database_url(url)).render_as_string(hide_password=True)


# How long a new SQLite connection keeps asking for WAL mode while other connections hold the
# lock that switching needs (see `use_wal`).
WAL_SWITCH_WAIT_S = 60.0


def use_wal(conn: sqlite3.Connection, wait_s: float = WAL_SWITCH_WAIT_S) -> None:
    """`PRAGMA journal_mode=WAL` on a new connection, asked again while SQLite answers "database
    is locked". Switching a new database to WAL needs a lock that SQLite refuses at once, without
    its busy timeout, while another connection takes it: processes (or threads) opening a new
    database together would otherwise fail now and then."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def create_database_engine(url: str | Path | URL) -> Engine:
    """An engine with each backend's settings: SQLite's durability pragmas, Postgres's pool."""
    url = url if isinstance(url, URL) else parse_database_url(url)
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            engine = create_engine(url, connect_args={"check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _pragmas(conn, _record):  # durability with decent write speed
                use_wal(conn)
                conn.execute("PRAGMA synchronous=FULL")

            return engine
        if backend == "postgresql":
            # Requests run on many threads (the event loop, the bookkeeping thread, FastAPI's
            # thread pool): enough connections that they rarely wait for one, checked before use
            # so a restarted Postgres costs one retry, not an error. Sessions speak UTC, so
            # timestamps read back as UTC whatever the server's TimeZone.
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=3600,
                                   connect_args={"options": "-c timezone=UTC", "connect_timeout": 10})

            @event.listens_for(engine, "handle_error")
            def _nul_is_bad_input(context):
                # Postgres text cannot hold NUL; SQLite can. A request naming a run, session or
                # search string with one is the client's mistake (400), as it finds nothing on SQLite.
                if "cannot contain NUL" in str(context.original_exception):
                    raise UserError("text values may not contain NUL (\\x00) characters") from None

            return engine
        return create_engine(url)
    except ModuleNotFoundError as exc:
        extra = " (pip install 'tinkerd[postgres]')" if backend == "postgresql" else ""
        raise DatabaseError(f"no driver for {shown(url)}: {exc}{extra}") from None
    except (ArgumentError, SQLAlchemyError) as exc:
        raise DatabaseError(f"cannot use database {shown(url)}: {exc}") from None


def open_database(url: str | Path) -> sessionmaker:
    """Sessions on the database at `url` (a Path: a SQLite file), its schema brought up to
    date first (core/migrate.py)."""
    from tinkerd.core.migrate import upgrade_to_head

    engine = create_database_engine(url)
    upgrade_to_head(engine)
    return sessionmaker(engine, expire_on_commit=False)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite drops tz info (Postgres keeps it); everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)
