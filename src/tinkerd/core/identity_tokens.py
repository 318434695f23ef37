"""Identity tokens: the short-lived JWTs the SDK exchanges its API key for (`/auth/token`).

With `pjwt_auth_enabled` in its client config, the SDK trades its key for a JWT once, sends
the JWT instead of the key on every request, and refreshes it at half its lifetime; it also
reads the caller's identity from the JWT's claims (`RestClient.whoami`, `tinker auth whoami`),
which is why tinkerd issues them at all.

A token is an HS256 JWT signed with a random secret kept in the data dir (created once,
0600, like the download-URL key), so tokens outlive a restart. Its claims name the user
(`sub`, `tml:user:<name>`), the organization (`org_id`: every user of one server is in one)
and the SHA-256 of the key it was issued for (`key`): each request re-checks that key the
way it would check the key itself, so revoking a key ends its tokens as quickly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from tinkerd.core.secret_file import read_or_create_secret

SIGNING_KEY_FILE = "jwt-signing.key"
LIFETIME_SECONDS = 3600
ORG_ID = "tinkerd"
USER_URN_PREFIX = "tml:user:"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def looks_like_token(credential: str) -> bool:
    return credential.startswith("eyJ") and credential.count(".") == 2


class IdentityTokens:
    def __init__(self, data_dir: Path, clock=time.time):  # noqa: ANN001 - a () -> float
        self.file = data_dir / SIGNING_KEY_FILE
        self.clock = clock
        self._secret: bytes | None = None

    def _sign(self, signing_input: str) -> str:
        if self._secret is None:
            self._secret = read_or_create_secret(self.file)
        return _b64(hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest())

    def issue(self, user_name: str, key_hash: str) -> str:
        now = int(self.clock())
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        claims = {"iss": "tinkerd", "sub": USER_URN_PREFIX + user_name, "org_id": ORG_ID, "email": "", "key": key_hash,
                  "iat": now, "exp": now + LIFETIME_SECONDS}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{header}.{body}.{self._sign(f'{header}.{body}')}"

    def key_hash_of(self, token: str) -> str | None:
        """The hash of the key a valid, unexpired token was issued for; None otherwise."""
        header, _, rest = token.partition(".")
        body, _, signature = rest.partition(".")
        if not hmac.compare_digest(signature, self._sign(f"{header}.{body}")):
            return None
        try:
            claims = json.loads(_unb64(body))
            expires, key_hash = float(claims["exp"]), str(claims["key"])
        except (ValueError, KeyError, TypeError):
            return None
        return key_hash if self.clock() < expires else None
