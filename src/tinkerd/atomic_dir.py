"""Directories that appear whole or not at all (checkpoints, exported models).

Everything is written into a hidden sibling (`.NAME.tmp-PID`), then renamed over the
target in one step: a crash mid-write leaves only the sibling, which the next server start
removes, never a half-written directory under the target's name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(target: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh directory to write into; on success it replaces `target` (with `fsync`,
    its files reach the disk first), on failure it is removed and `target` is untouched."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
