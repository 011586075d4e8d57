"""Crash-safe file writes (standard library only, so every layer can use them).

A file is written under a temporary name in the same folder, flushed, fsynced, then renamed over the
target: a reader sees the old file or the new one, never half of one, and an error leaves no debris.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only when the block ends without an error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise OSError unless ``path`` is, or could be created as, a directory this process can write.

    Checked before long work (data preparation, training) so a bad output path fails at once.
    Nothing is created here.
    """
    path = Path(path)
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(20, f"{what}: {probe} is not a directory", str(path))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(13, f"{what}: {probe} is not writable", str(path))
