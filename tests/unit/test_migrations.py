"""Schema migrations, on SQLite and on Postgres: a database made before migrations existed
opens with today's code and keeps its runs and checkpoints; revision 0001 is exactly that
old schema; the models and the newest revision agree; checkpoint sizes past 2 GiB fit."""

from __future__ import annotations

import datetime as dt
import re
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from tinkerd.core.access import User
from tinkerd.core.db import Base, CheckpointRow, DatabaseError, RunRow, SessionRow, open_database
from tinkerd.core.migrate import BASELINE, alembic_config, head_revision
from tinkerd.core.registry import Registry

OLD_SCHEMA = Path(__file__).resolve().parents[1] / "fixtures" / "schema_before_migrations.sql"
BIG = 5 * 2**31 + 7  # a 10 GiB checkpoint


def old_statements() -> list[str]:
    sql = "\n".join(line for line in OLD_SCHEMA.read_text().splitlines() if not line.startswith("--"))
    return [s.strip() for s in sql.split(";") if s.strip()]


def make_database_before_migrations(url: str) -> None:
    """A database as the release before migrations left it, with one session, run and
    checkpoint written the way that release wrote them (SQLite: its own DDL, verbatim; Postgres,
    which it could not be pointed at: revision 0001 without the version table)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            for statement in old_statements():
                conn.exec_driver_sql(statement)
        else:
            command.upgrade(alembic_config(conn), BASELINE)
            conn.exec_driver_sql("DROP TABLE alembic_version")
        created = dt.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
        values = {"t": created if engine.dialect.name != "sqlite" else "2026-11-30 12:00:00.123456", "f": False, "y": True}
        conn.execute(text("INSERT INTO sessions VALUES ('sess-old', :t, :t, 'finished', '[\"a\"]', '{}', 'alice')"), values)
        conn.execute(text("INSERT INTO training_runs VALUES ('sess-old:train:0', 'sess-old', 'm', 8, :y, :y, :f, 3, "
                          "'{\"purpose\": \"kept\"}', :t, :t, :f, 'alice')"), values)
        conn.execute(text("INSERT INTO checkpoints (run_id, kind, name, directory, created_at, size_bytes, public, user_metadata, "
                          "expires_at, has_optimizer) VALUES ('sess-old:train:0', 'weights', 'step-1', '/data/ckpt', :t, 123456789, "
                          ":y, '{}', NULL, :y)"), values)
    engine.dispose()


def test_a_database_from_before_migrations_keeps_its_runs_and_checkpoints(database_url: str, tmp_path: Path):
    make_database_before_migrations(database_url)
    db = open_database(database_url)
    engine = db.kw["bind"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
    with db() as s:
        session = s.get(SessionRow, "sess-old")
        run = s.get(RunRow, "sess-old:train:0")
        old = s.scalars(select(CheckpointRow)).one()
    assert session.tags == ["a"] and session.owner == "alice" and session.status == "finished"
    assert run.lora_rank == 8 and run.train_mlp is True and run.train_unembed is False and run.seed == 3
    assert run.user_metadata == {"purpose": "kept"}
    assert (old.name, old.size_bytes, old.public, old.has_optimizer, old.expires_at) == ("step-1", 123456789, True, True, None)
    assert old.created_at.replace(tzinfo=dt.timezone.utc) == dt.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    # what the listing shows for them, through the same queries the REST routes use
    checkpoints, total = Registry(db, tmp_path).list_checkpoints(User("alice"))
    assert total == 1 and checkpoints[0].id == old.id

    # sizes past 2 GiB now fit, beside the old row and in new ones
    with db.begin() as s:
        s.get(CheckpointRow, old.id).size_bytes = BIG
        s.add(CheckpointRow(run_id=run.id, kind="weights", name="step-2", directory="/data/ckpt2", size_bytes=BIG + 1))
    with db() as s:
        sizes = {c.name: (c.id, c.size_bytes) for c in s.scalars(select(CheckpointRow))}
    assert sizes["step-1"] == (old.id, BIG) and sizes["step-2"][1] == BIG + 1 and sizes["step-2"][0] > old.id
    assert Registry(db, tmp_path).checkpoint_usage() == {"weights": (2, 2 * BIG + 1)}
    # the unique name per run and kind survived the table's rebuild
    with pytest.raises(IntegrityError), db.begin() as s:
        s.add(CheckpointRow(run_id=run.id, kind="weights", name="step-1", directory="/elsewhere"))
    assert "ix_checkpoints_run_id" in {i["name"] for i in inspect(engine).get_indexes("checkpoints")}
    engine.dispose()


def test_before_the_upgrade_postgres_could_not_hold_a_large_checkpoint(postgres):
    """Why revision 0002 exists: the old 32-bit column refuses a size past 2 GiB."""
    url = postgres.create_database()
    try:
        make_database_before_migrations(url)
        engine = create_engine(url)
        with pytest.raises(DBAPIError, match="out of range"), engine.begin() as conn:
            conn.execute(text("UPDATE checkpoints SET size_bytes = :big"), {"big": BIG})
        engine.dispose()
    finally:
        postgres.drop_database(url)


def _schema(ddl: list[str]) -> list[str]:
    return sorted(re.sub(r"\s+", " ", statement).replace('"', "").strip() for statement in ddl)


def test_the_baseline_is_the_schema_of_the_release_before_migrations(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'baseline.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), BASELINE)
        made = [sql for (name, sql) in conn.execute(text("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
                if name != "alembic_version"]
    engine.dispose()
    assert _schema(made) == _schema(old_statements())


def test_the_models_match_the_newest_revision(database_url: str):
    """A change to core/db.py without a revision for it fails here (docs/database.md)."""
    db = open_database(database_url)
    engine = db.kw["bind"]
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert differences == []


def test_a_new_database_opened_by_two_processes_at_once_is_migrated_once(database_url: str):
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            open_database(database_url).kw["bind"].dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    engine.dispose()


def test_an_open_waits_for_a_migration_that_holds_sqlite_longer_than_its_default_timeout(tmp_path: Path):
    """Another process's migration (an older tinkerd's, or one slowed by a busy host) holds
    SQLite's write lock past the sqlite3 module's 5 s busy timeout: the open waits its turn
    instead of failing with "database is locked"."""
    import sqlite3
    import time

    path = tmp_path / "tinkerd.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")  # what a migration holds while it runs
    opened: list[object] = []
    opener = threading.Thread(target=lambda: opened.append(_open_or_error(f"sqlite:///{path}")))
    opener.start()
    held_since = time.monotonic()
    while time.monotonic() - held_since < 5.5:  # past sqlite3's default busy timeout
        opener.join(0.1)
        assert not opened, f"opened while the lock was held: {opened}"
    holder.execute("COMMIT")
    holder.close()
    opener.join(60)
    assert opened and not isinstance(opened[0], BaseException), opened


def test_a_new_connection_asks_again_for_wal_while_sqlite_refuses_it_at_once():
    """Switching a new database to WAL needs a lock SQLite may refuse at once, without its busy
    timeout, while another connection takes it (three threads opening one new database failed
    about once in 150 tries on a loaded host): the switch is asked for again, and any other
    error still surfaces."""
    import sqlite3

    from tinkerd.core.db import use_wal

    class Contended:
        def __init__(self, refusals: int, message: str = "database is locked"):
            self.refusals, self.message, self.asked = refusals, message, 0

        def execute(self, sql: str):
            assert sql == "PRAGMA journal_mode=WAL"
            self.asked += 1
            if self.asked <= self.refusals:
                raise sqlite3.OperationalError(self.message)
            return sqlite3.connect(":memory:").execute("SELECT 'wal'")

    conn = Contended(refusals=3)
    use_wal(conn)  # type: ignore[arg-type]
    assert conn.asked == 4
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        use_wal(Contended(refusals=1, message="disk I/O error"))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(Contended(refusals=10**6), wait_s=0.1)  # type: ignore[arg-type]


def _open_or_error(url: str) -> object:
    try:
        open_database(url).kw["bind"].dispose()
        return "opened"
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        return exc


def test_a_database_from_a_newer_tinkerd_is_refused(database_url: str):
    open_database(database_url).kw["bind"].dispose()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(DatabaseError, match="newer tinkerd"):
        open_database(database_url)
