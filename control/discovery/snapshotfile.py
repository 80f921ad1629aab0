"""Snapshot files written in pieces, atomically: a crash leaves the old or the new file."""

from __future__ import annotations

import os
from pathlib import Path


class AtomicWriter:
    """Write to ``PATH.tmp`` chunk by chunk; ``commit`` syncs it and renames it over PATH.

    Blocking (file I/O): call it from a thread when an event loop must keep running.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None, "writer already closed"
        view = memoryview(chunk)
        self.size += len(view)
        while view:
            view = view[os.write(self._fd, view) :]

    def commit(self) -> None:
        assert self._fd is not None, "writer already closed"
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.tmp.unlink(missing_ok=True)


def write_atomic(path: Path, blob: bytes) -> None:
    """Replace ``path`` with ``blob`` so that a crash leaves the old or the new file, whole."""
    writer = AtomicWriter(path)
    try:
        writer.write(blob)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
