"""File-system calls shared by the audit log's writer and its rotation: an
exclusive-locked append open, whole writes, a directory fsync, and the short
reason of an OSError for messages."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


class _Locked(Exception):
    pass


def _open_locked(path: Path) -> tuple[int, tuple[int, int]]:
    # O_RDWR, not O_WRONLY: resuming reads the tail with pread.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
    except BlockingIOError:
        os.close(fd)
        raise _Locked("another process is writing it") from None
    except OSError:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Call ``fn``, ignoring OSError: for undoing what may not have happened."""
    try:
        fn(*args)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
