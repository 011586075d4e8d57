"""Crash-safe file writes and run-directory ownership (standard library only, so every layer can use them).

A file is written under a temporary name in the same folder, flushed, fsynced, then renamed over the
target: a reader sees the old file or the new one, never half of one, and an error leaves no debris.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import UserError


class DiskFull(UserError):
    """The disk filled up while writing; the message says where and what was (not) lost."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full (an OSError's ENOSPC, or a library's wrapped message)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


@contextmanager
def disk_full_is_user_error(path: str | Path, consequence: str) -> Iterator[None]:
    """Inside the block, a full disk becomes one UserError naming ``path`` and ``consequence`` (what is
    and is not lost), instead of a library's traceback; other errors pass through unchanged. An inner
    block's DiskFull is restated by the outer one, whose consequence is the one the user cares about."""
    try:
        yield
    except DiskFull:
        raise DiskFull(f"no space left on the device holding {path}; {consequence}") from None
    except UserError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFull(f"no space left on the device holding {path}; {consequence}") from None
        raise


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only when the block ends without an error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with disk_full_is_user_error(path, "it was not written (an earlier version, if any, is intact)"):
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


LOCK_FILE = ".lock"
_HELD: dict[str, list] = {}  # run directories this process holds: resolved path -> [open lock file, depth]


class RunDirInUse(UserError):
    """Another live process holds the run directory's lock."""


def check_run_dir_free(directory: str | Path, what: str = "run") -> None:
    """A RunDirInUse when another live process holds ``directory``'s lock (nothing is created or kept)."""
    import fcntl

    path = Path(directory) / LOCK_FILE
    if str(Path(directory).resolve()) in _HELD or not path.is_file():
        return
    with open(path, "r", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown process"
            raise RunDirInUse(f"{directory} is in use by another {what} ({holder}); wait for it to finish or "
                              f"choose another --out") from None


@contextmanager
def run_dir_lock(directory: str | Path, what: str = "run") -> Iterator[Path]:
    """Own ``directory`` for the block: an exclusive ``flock`` on ``directory/.lock`` holding pid and host.

    A second writer (another ``train``/``finetune`` into the same ``--out``) gets a RunDirInUse naming
    the holder, before it writes anything. The kernel drops a flock when its process dies, so the
    lock of a crashed run is taken over (with a notice naming the dead pid). Re-entrant within a
    process (the CLI and the training loop both take it). The lock file is removed on exit.
    """
    import fcntl
    import logging
    import socket

    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield directory
        finally:
            _HELD[key][1] -= 1
        return
    path = directory / LOCK_FILE
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise RunDirInUse(f"{directory} is in use by another {what} ({holder}); wait for it to finish or "
                              f"choose another --out") from None
        try:  # the holder may have removed the file between our open and our lock: lock the current one
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        logging.getLogger("custom_llm").warning("%s: taking over the lock of a process that is gone (%s)",
                                                directory, previous)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    _HELD[key] = [handle, 1]
    try:
        yield directory
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            del _HELD[key]
            try:
                path.unlink()
                if created:
                    directory.rmdir()  # a run that wrote nothing leaves nothing (fails, harmlessly, if it did)
            except OSError:
                pass
            handle.close()  # closing releases the flock
