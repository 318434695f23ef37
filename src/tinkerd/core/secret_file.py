"""A secret of the data dir (the signing keys of download URLs and identity tokens)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_or_create_secret(file: Path) -> bytes:
    """32 random bytes kept in `file`, created once (0600); the first writer wins, even
    against a concurrent process."""
    try:
        return file.read_bytes()
    except FileNotFoundError:
        pass
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, file)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return file.read_bytes()
