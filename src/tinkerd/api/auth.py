"""Who is calling: the API key of a request, and the user it stands for.

Three kinds of key are accepted, each also through an identity token issued for it
(core/identity_tokens.py), which the SDK sends instead of its key:
- a key made with `tinkerd keys create`: its named user (core/keys.py);
- a key given to `tinkerd serve --api-key`: the one local user, as before users existed;
- while no key was ever created and no `--api-key` is given, any key starting with `tml-`:
  the local user too (zero setup, which `tinkerd serve` allows only on loopback unless
  told otherwise).
"""

from __future__ import annotations

from fastapi import Request

from tinkerd.core.access import LOCAL_USER, User
from tinkerd.core.identity_tokens import IdentityTokens, looks_like_token
from tinkerd.core.keys import KEY_PREFIX, ApiKeys, hash_key


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


class Admission:
    def __init__(self, keys: ApiKeys, fixed_keys: set[str] | None = None, tokens: IdentityTokens | None = None):
        self.keys = keys
        self.fixed_keys = fixed_keys
        self.fixed_hashes = {hash_key(k) for k in fixed_keys} if fixed_keys is not None else None
        self.tokens = tokens

    def user_for(self, key: str) -> User | None:
        """The user `key` (an API key, or an identity token issued for one) stands for, or
        None when it is refused."""
        if self.tokens is not None and looks_like_token(key):
            key_hash = self.tokens.key_hash_of(key)
            return self.user_for_hash(key_hash) if key_hash is not None else None
        if self.fixed_keys is not None and key in self.fixed_keys:
            return LOCAL_USER
        if self.keys.any_created():
            return self.keys.user_for(key) if key.startswith(KEY_PREFIX) else None
        if self.fixed_keys is None and key.startswith(KEY_PREFIX):
            return LOCAL_USER
        return None

    def user_for_hash(self, key_hash: str) -> User | None:
        """As user_for, for the key whose hash this is (an identity token's key): the key is
        checked again on every request, so revoking it ends its tokens too."""
        if self.fixed_hashes is not None and key_hash in self.fixed_hashes:
            return LOCAL_USER
        if self.keys.any_created():
            return self.keys.user_for_hash(key_hash)
        return LOCAL_USER if self.fixed_keys is None else None

    def refusal(self) -> str:
        if self.fixed_keys is None and not self.keys.any_created():
            return f"invalid API key: keys start with {KEY_PREFIX!r}"
        return "invalid API key: unknown or revoked"


def caller(request: Request) -> User:
    """The user of an authenticated request (a FastAPI dependency of every route that acts for one)."""
    return request.state.user
