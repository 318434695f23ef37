"""A checkpoint's files as one uncompressed tar, streamed as it is written.

SDK 0.34 and 0.35 download a checkpoint as a single archive (their
`get_checkpoint_archive_url` and `tinker checkpoint download`), which they untar and, for
`push-hf`, expect to hold the PEFT adapter plus an empty `checkpoint_complete` marker.
Nothing is written to disk: each member's header and bytes are yielded in turn. Every file
is opened before the first byte goes out, so a checkpoint deleted or overwritten while it
downloads (a new version gets a new directory) still streams whole.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

COMPLETE_MARKER = "checkpoint_complete"
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE


def archive_members(directory: Path) -> list[Path]:
    """The files an archive of `directory` holds: every plain, non-hidden file, by name."""
    return sorted(f for f in directory.iterdir() if f.is_file() and not f.name.startswith("."))


def _header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> int:
    return -size % BLOCK


class CheckpointArchive:
    """The tar of one checkpoint directory: its files are opened here, at once; `size` is the
    archive's length in bytes (a Content-Length); iterate over it once for the bytes."""

    def __init__(self, directory: Path, mtime: float):
        self._files = []
        try:
            for path in archive_members(directory):
                self._files.append(open(path, "rb"))
        except OSError:
            self.close()
            raise
        # fstat: the size of the version opened, even if its path names another by now
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._members = [(_header(Path(f.name).name, size, mtime), f, size) for f, size in zip(self._files, sizes, strict=True)]
        self._end = _header(COMPLETE_MARKER, 0, mtime) + bytes(2 * BLOCK)  # the marker, then the end of the archive
        self.size = len(self._end) + sum(len(header) + size + _padding(size) for header, _, size in self._members)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for header, f, size in self._members:
                yield header
                sent = 0
                while sent < size:
                    chunk = f.read(min(CHUNK, size - sent))
                    if not chunk:  # truncated under us: zeros keep the archive its announced length
                        chunk = bytes(min(CHUNK, size - sent))
                    sent += len(chunk)
                    yield chunk
                if _padding(size):
                    yield bytes(_padding(size))
            yield self._end
        finally:
            self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
