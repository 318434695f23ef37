"""Where tinkerd keeps its state."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    if os.environ.get("TINKERD_DATA_DIR"):
        return Path(os.environ["TINKERD_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tinkerd"


def database_url_from_env() -> str | None:
    """$TINKERD_DATABASE_URL, if set; None means the SQLite file in the data dir
    (core/db.py: default_database_url)."""
    return os.environ.get("TINKERD_DATABASE_URL") or None
