"""API keys without a server: what is stored, how long a running server may remember a key,
and an existing data dir (made before keys existed) opening with the new table; on SQLite
and on Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from tinkerd.core.db import ApiKeyRow, Base, open_database
from tinkerd.core.keys import CACHE_SECONDS, ApiKeys, hash_key
from tinkerd.core.migrate import BASELINE, alembic_config
from tinkerd.types import NotFound, UserError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url: str):
    db = open_database(database_url)
    yield db
    db.kw["bind"].dispose()


def test_a_key_is_shown_once_and_only_its_hash_is_stored(db, database_url: str, tmp_path: Path):
    keys = ApiKeys(db)
    key = keys.create("alice")
    assert key.startswith("tml-") and len(key) >= 4 + 43  # 256 bits in url-safe base64
    assert keys.create("bob") != key
    with db() as s:
        stored = repr(s.execute(text("SELECT * FROM api_keys")).all())
    assert key[4:] not in stored
    if database_url.startswith("sqlite"):  # nor anywhere in the files, the write-ahead log included
        raw = (tmp_path / "tinkerd.sqlite").read_bytes() + b"".join(
            p.read_bytes() for p in tmp_path.glob("tinkerd.sqlite-*"))
        assert key.encode() not in raw and key[4:].encode() not in raw
    with db() as s:
        assert s.query(ApiKeyRow).filter_by(name="alice").one().key_hash == hash_key(key)
    assert keys.user_for(key).name == "alice" and not keys.user_for(key).admin


def test_admin_names_and_one_key_per_name(db):
    keys = ApiKeys(db)
    admin_key = keys.create("root", admin=True)
    assert keys.user_for(admin_key).admin
    with pytest.raises(UserError, match="already has a key"):
        keys.create("root")
    for bad in ("", "a b", "x" * 65, "../etc"):
        with pytest.raises(UserError, match="invalid user name"):
            keys.create(bad)
    with pytest.raises(NotFound):
        keys.revoke("nobody")


def test_revoked_keys_are_refused_once_the_cache_forgets_them(db):
    clock = Clock()
    server = ApiKeys(db, clock=clock)  # the running server's view
    offline = ApiKeys(db)  # `tinkerd keys ...` in another process
    assert not server.any_created()
    key = offline.create("alice")
    assert server.any_created() is False  # remembered for CACHE_SECONDS ...
    clock.now += CACHE_SECONDS
    assert server.any_created() is True  # ... then read again
    assert server.user_for(key).name == "alice"
    offline.revoke("alice")
    clock.now += CACHE_SECONDS / 2
    assert server.user_for(key) is not None  # within the cache's time
    clock.now += CACHE_SECONDS / 2
    assert server.user_for(key) is None
    assert server.any_created()  # revoking every key does not reopen the server to any key
    new_key = offline.create("alice")  # the same user, a new key
    assert server.user_for(new_key).name == "alice" and server.user_for(key) is None


def test_last_use_and_listing(db):
    keys = ApiKeys(db)
    key = keys.create("alice")
    keys.create("bob", admin=True)
    assert [r.last_used_at for r in keys.list()] == [None, None]
    keys.user_for(key)
    listed = {r.name: r for r in keys.list()}
    assert listed["alice"].last_used_at is not None and listed["bob"].last_used_at is None
    assert listed["bob"].admin and listed["alice"].revoked_at is None


def test_a_data_dir_from_before_keys_opens_and_gets_the_table(database_url: str):
    engine = create_engine(database_url)
    with engine.begin() as conn:  # the schema as it was: the baseline's tables but api_keys, and no migrations yet
        command.upgrade(alembic_config(conn), BASELINE)
        conn.exec_driver_sql("DROP TABLE api_keys")
        conn.exec_driver_sql("DROP TABLE alembic_version")
    assert "api_keys" not in inspect(engine).get_table_names()
    reopened = open_database(database_url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    assert ApiKeys(reopened).user_for(ApiKeys(reopened).create("alice")).name == "alice"
    engine.dispose()
    reopened.kw["bind"].dispose()
