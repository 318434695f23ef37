"""Who is calling: the API key of a request, and the user it stands for.

Three kinds of key are accepted:
- a key made with `tinkerd keys create`: its named user (core/keys.py);
- a key given to `tinkerd serve --api-key`: the one local user, as before users existed;
- while no key was ever created and no `--api-key` is given, any key starting with `tml-`:
  the local user too (zero setup, which `tinkerd serve` allows only on loopback unless
  told otherwise).
"""

from __future__ import annotations

from fastapi import Request

from tinkerd.core.access import LOCAL_USER, User
from tinkerd.core.keys import KEY_PREFIX, ApiKeys


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


class Admission:
    def __init__(self, keys: ApiKeys, fixed_keys: set[str] | None = None):
        self.keys = keys
        self.fixed_keys = fixed_keys

    def user_for(self, key: str) -> User | None:
        """The user `key` stands for, or None when it is refused."""
        if self.fixed_keys is not None and key in self.fixed_keys:
            return LOCAL_USER
        if self.keys.any_created():
            return self.keys.user_for(key) if key.startswith(KEY_PREFIX) else None
        if self.fixed_keys is None and key.startswith(KEY_PREFIX):
            return LOCAL_USER
        return None

    def refusal(self) -> str:
        if self.fixed_keys is None and not self.keys.any_created():
            return f"invalid API key: keys start with {KEY_PREFIX!r}"
        return "invalid API key: unknown or revoked"


def caller(request: Request) -> User:
    """The user of an authenticated request (a FastAPI dependency of every route that acts for one)."""
    return request.state.user
