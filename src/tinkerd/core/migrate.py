"""Bringing the metadata schema up to date: run whenever tinkerd opens its database (the
server at start, and each offline command), with Alembic driven from code.

- A fresh database gets every revision in core/migrations/versions/.
- A database made before migrations existed (tinkerd's tables, no `alembic_version`) is
  adopted at the baseline revision, which creates only what is missing, then upgraded.
- A database already at the newest revision is left alone, after one small read.
- A database from a newer tinkerd (a revision this one does not know) is refused.

All revisions and the version stamp commit in one transaction, so a crash mid-upgrade
leaves the schema as it was. Two processes opening the same database at once (the server
and `tinkerd keys create`) take turns: SQLite's write lock (BEGIN IMMEDIATE, waited for up
to SQLITE_LOCK_WAIT_S), Postgres's advisory lock.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from tinkerd.core.db import DatabaseError, shown, use_wal

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
VERSION_TABLE = "alembic_version"
LEGACY_MARKER_TABLE = "training_runs"  # in every tinkerd database since the first release
_POSTGRES_LOCK_KEY = 0x74696E6B64  # "tinkd": the advisory lock migrations hold on Postgres
# How long an open waits for SQLite's write lock while another process migrates (or holds
# it): sqlite3's default of 5 s is shorter than a migration on a busy host can take. Postgres's
# advisory lock waits as long as it is held.
SQLITE_LOCK_WAIT_S = 300.0

log = logging.getLogger(__name__)
# Alembic is imported inside the functions, after this: its import logs a line per plugin at INFO.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def alembic_config(connection: Connection | None = None) -> Config:
    """The configuration `alembic.ini` would hold, built in code (no file at run time)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@functools.lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "core/migrations/versions has no revisions"
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision a database is at; None for a fresh one or one made before migrations."""
    if VERSION_TABLE not in inspect(connection).get_table_names():
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def _migration_engine(engine: Engine) -> Engine:
    """For SQLite, an engine whose transactions really begin with BEGIN IMMEDIATE: Python's
    sqlite3 otherwise commits before each DDL statement, and two processes could both decide
    to migrate. Postgres runs DDL in transactions as it is."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return engine
    migrating = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_LOCK_WAIT_S})

    @event.listens_for(migrating, "connect")
    def _connect(conn, _record):
        conn.isolation_level = None  # SQLAlchemy's "begin" event below issues BEGIN itself
        use_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")

    @event.listens_for(migrating, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating


def upgrade_to_head(engine: Engine) -> None:
    """Bring the database behind `engine` to the newest revision (see the module docstring)."""
    head = head_revision()
    migrating = _migration_engine(engine)
    try:
        with migrating.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_LOCK_KEY})
            current = current_revision(conn)
            if current == head:
                return
            if current is not None and current not in known_revisions():
                raise DatabaseError(f"the database {shown(engine.url)} is at schema revision {current!r}, which this "
                                    f"tinkerd does not know (its newest is {head!r}): it was written by a newer tinkerd")
            if current is not None:
                log.info("upgrading database %s from schema revision %s to %s", shown(engine.url), current, head)
            elif LEGACY_MARKER_TABLE in inspect(conn).get_table_names():
                log.info("database %s was made before schema migrations: adopting it at revision %s, then upgrading to %s",
                         shown(engine.url), BASELINE, head)
            else:
                log.info("creating the schema (revision %s) in database %s", head, shown(engine.url))
            from alembic import command

            command.upgrade(alembic_config(conn), "head")
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseError(f"cannot open database {shown(engine.url)}: {reason}") from exc
    finally:
        if migrating is not engine:
            migrating.dispose()
