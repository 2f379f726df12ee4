"""File-system calls shared by the audit log's writer and its rotation: an
exclusive-locked append open that follows no symbolic link and checks what
it opened, whole writes, a directory fsync, and the short reason of an
OSError for messages."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path


class _Locked(Exception):
    pass


class _NotOurs(OSError):
    """What is at the path is not a file the log may write (see _open_checked)."""


# O_NOFOLLOW: a symbolic link put at the path is never followed (the log
# once appended to whatever file a link there named, as root any file).
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _open_checked(path: Path, flags: int, *, exclusive: bool = False) -> int:
    """Open (creating, mode 0600) a file of the log at ``path`` without
    following a symbolic link, and make sure of what was opened: a regular
    file owned by this process's user (never a device such as /dev/full, a
    FIFO, or a file someone else put there). ``exclusive``: the file must
    not exist yet. Raises OSError (``_NotOurs`` for a file of the wrong kind
    or owner, with a short reason as its strerror)."""
    flags |= os.O_CREAT | _NOFOLLOW | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer to a symbolic link
            raise _NotOurs(e.errno, "it is a symbolic link (refused: never followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotOurs(errno.EINVAL, "it is not a regular file")
        if st.st_uid != os.geteuid():
            raise _NotOurs(errno.EPERM, f"it is owned by uid {st.st_uid}, not by signerd's "
                           f"user (uid {os.geteuid()})")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_locked(path: Path, *, exclusive: bool = False) -> tuple[int, tuple[int, int]]:
    """Open the log file at ``path`` for appending (:func:`_open_checked`)
    and take its exclusive lock. Returns the fd and its (st_dev, st_ino).
    Raises OSError, _Locked if another process holds the lock."""
    # O_RDWR, not O_WRONLY: resuming reads the tail with pread.
    fd = _open_checked(path, os.O_RDWR | os.O_APPEND, exclusive=exclusive)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        # What is at the path now is what was opened and locked (not a file
        # or link put there meanwhile): the inode the chain goes on in.
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise _NotOurs(errno.EAGAIN, "it was replaced while it was being opened")
    except BlockingIOError:
        os.close(fd)
        raise _Locked("another process is writing it") from None
    except OSError:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


def _open_head(path: Path) -> int:
    """Open the head file at ``path`` for pwrite (:func:`_open_checked`)."""
    return _open_checked(path, os.O_RDWR)


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


def _free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s file
    system (statvfs f_bavail); 0 if it cannot be asked."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
