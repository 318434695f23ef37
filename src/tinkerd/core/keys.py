"""API keys of named users: created, listed and revoked offline (`tinkerd keys ...`, against
the data dir, also while the server runs), and checked by the server on every request.

A key is `tml-` followed by 256 random bits; the database keeps only its SHA-256. The
server reads the table itself, through a cache that forgets each answer after
`CACHE_SECONDS`, so a key created or revoked by another process counts within seconds.

A user is a name: the owner of every session, run and checkpoint made with that user's
key, and a member of the projects that name it (core/projects.py; membership changes count
within the same seconds). A name has at most one key in use; revoking it and creating a new one under the same
name gives the same user (and what they own) a new key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from tinkerd.core.access import User
from tinkerd.core.db import ApiKeyRow, ProjectMemberRow, utcnow
from tinkerd.types import NotFound, UserError

KEY_PREFIX = "tml-"  # the SDK refuses any other key before it sends it
CACHE_SECONDS = 2.0  # how long a revoked key may still be accepted by a running server
LAST_USED_EVERY_SECONDS = 60.0  # last use is written at most this often per key: each write waits for the disk
_MAX_CACHED = 10_000  # unknown keys are cached too (a stream of guesses must not reach the database each time)
USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def hash_key(key: str) -> str:
    """The stored form of a key.

    A key holds 256 random bits, so nobody can find it from its hash (or guess it) by trying
    candidates: slow password hashes (bcrypt, argon2) exist for low-entropy passwords and
    would add nothing here but a delay on every request. A plain hash also lets a request
    find its key with one indexed lookup.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes = 256 bits


def check_user_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise UserError(f"invalid user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


class ApiKeys:
    def __init__(self, db: sessionmaker, clock: Callable[[], float] = time.monotonic):
        self.db = db
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, tuple[float, int | None, User | None]] = {}  # hash -> (read at, row id, user)
        self._any: tuple[float, bool] | None = None
        self._last_used_written: dict[int, float] = {}

    # -- management (the `tinkerd keys` commands) ------------------------------------------

    def create(self, name: str, admin: bool = False) -> str:
        """A new key for user `name`, returned once: only its hash is kept."""
        check_user_name(name)
        key = new_key()
        with self.db.begin() as s:
            if s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))) is not None:
                raise UserError(f"user {name!r} already has a key; revoke it first (tinkerd keys revoke {name})")
            s.add(ApiKeyRow(name=name, key_hash=hash_key(key), admin=admin))
        return key

    def revoke(self, name: str) -> None:
        with self.db.begin() as s:
            rows = list(s.scalars(select(ApiKeyRow).where(ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))))
            if not rows:
                raise NotFound(f"no key in use for user {name!r}")
            for row in rows:
                row.revoked_at = utcnow()

    def list(self) -> list[ApiKeyRow]:
        """Every key ever created, revoked ones included, oldest first."""
        with self.db() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)))

    # -- checking (the server) -------------------------------------------------------------

    def any_created(self) -> bool:
        """Whether any key was ever created: from then on only created keys are accepted
        (revoking every key does not bring back "any tml- key")."""
        now = self._clock()
        cached = self._any
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        with self.db() as s:
            found = (s.scalar(select(func.count()).select_from(ApiKeyRow)) or 0) > 0
        self._any = (now, found)
        return found

    def user_for(self, key: str) -> User | None:
        """The user of a key in use, or None (unknown or revoked)."""
        return self.user_for_hash(hash_key(key))

    def key_id(self, key: str) -> int | None:
        """The id of a key in use (what `tinker auth login` stores it under), or None."""
        with self.db() as s:
            return s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.key_hash == hash_key(key), ApiKeyRow.revoked_at.is_(None)))

    def revoke_key(self, key: str) -> None:
        """Revoke this one key (`tinker auth logout` deletes the key it logged in with)."""
        with self.db.begin() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(key), ApiKeyRow.revoked_at.is_(None)))
            if row is None:
                raise NotFound("this API key is not in use")
            row.revoked_at = utcnow()
        self._users.pop(hash_key(key), None)

    def user_for_hash(self, digest: str) -> User | None:
        """The user of the key in use whose hash is `digest` (an identity token names its key so)."""
        now = self._clock()
        cached = self._users.get(digest)
        if cached is None or now - cached[0] >= CACHE_SECONDS:
            with self.db() as s:
                row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None)))
                projects = frozenset(s.scalars(select(ProjectMemberRow.project_id).where(ProjectMemberRow.user == row.name))
                                     ) if row is not None else frozenset()
            cached = (now, row.id, User(row.name, bool(row.admin), projects)) if row is not None else (now, None, None)
            with self._lock:
                if len(self._users) >= _MAX_CACHED:
                    self._users.clear()
                self._users[digest] = cached
        _, row_id, user = cached
        if row_id is not None:
            self._note_use(row_id, now)
        return user

    def _note_use(self, row_id: int, now: float) -> None:
        last = self._last_used_written.get(row_id)
        if last is not None and now - last < LAST_USED_EVERY_SECONDS:
            return
        self._last_used_written[row_id] = now
        with self.db.begin() as s:
            row = s.get(ApiKeyRow, row_id)
            if row is not None:
                row.last_used_at = utcnow()
