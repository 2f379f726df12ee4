"""Reading the files signerd trusts (a config, a policy, a PIN) and checking
where it writes its audit log: one way for every such file, with sshd's
StrictModes rule for who may own and write it and its directories
(sshd_config(5)). :mod:`signerd.config`, :mod:`signerd.policy`, the clients
and ``signerd check-config`` read through here."""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from signerd.errors import ConfigError

# Bytes signerd reads of a file it trusts, at most (read_trusted): a config or
# policy file is a few KB, a PIN a few bytes. /dev/zero as a policy ended in
# MemoryError before there was a bound.
MAX_CONFIG_BYTES = 1 << 20
MAX_PIN_BYTES = 1024


_warned: set[Path] = set()


def warn_if_exposed(path: Path, what: str) -> None:
    """Log a warning when a secret file is readable by group or others."""
    import logging

    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and path not in _warned:
        _warned.add(path)
        logging.getLogger("signerd").warning(
            "secret file is accessible by group or others; chmod 600 it",
            extra={"fields": {"file": str(path), "what": what, "mode": oct(mode & 0o777)}},
        )


def _owners() -> tuple[int, int]:
    """The owners a trusted file or directory may have: root and the daemon's user."""
    return 0, os.geteuid()


def file_problem(st: os.stat_result, *, secret: bool = False) -> str | None:
    """Why a file with status ``st`` must not be trusted, or None.

    The rule is sshd's StrictModes (sshd_config(5)): a regular file, owned by
    root or the daemon's user, that neither its group nor others may write;
    a secret (a PIN file) that neither may even read (mode 0600 or 0400).
    Others who can write a policy or config decide who signs; others who can
    read a PIN can log in to the token."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file ({_kind_of(st.st_mode)})"
    if st.st_uid not in _owners():
        return (f"is owned by uid {st.st_uid}, not by root or signerd's user "
                f"(uid {os.geteuid()}); chown it")
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"is accessible by group or others (mode {mode:04o}); chmod 600 it"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {mode:04o}); chmod go-w it"
    return None


def directory_problem(directory: Path, *, sticky_ok: bool = True) -> str | None:
    """Why ``directory`` (a resolved path) lets someone else replace what is
    in it, or None: as sshd's StrictModes, it must be owned by root or the
    daemon's user and not writable by group or others. ``sticky_ok``: a
    root-owned sticky directory (``/tmp``, mode 1777) is accepted, since no
    one can rename or remove there what they do not own."""
    try:
        st = os.lstat(directory)
    except OSError as e:
        return f"{directory} cannot be examined: {e.strerror}"
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory ({_kind_of(st.st_mode)})"
    if st.st_uid not in _owners():
        return (f"directory {directory} is owned by uid {st.st_uid}, not by root or signerd's "
                f"user (uid {os.geteuid()})")
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
            sticky_ok and st.st_uid == 0 and mode & stat.S_ISVTX):
        return (f"directory {directory} is writable by group or others (mode {mode:04o}): "
                "they could replace what is in it; chmod go-w it")
    return None


def path_problem(path: Path) -> str | None:
    """The first directory above ``path`` (a resolved path) that would let
    someone other than root or the daemon's user replace it (see
    :func:`directory_problem`), or None. Every ancestor up to ``/`` is
    checked, as sshd checks the path of ``authorized_keys``."""
    for directory in path.parents:
        problem = directory_problem(directory)
        if problem is not None:
            return problem
    return None


def _kind_of(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def read_trusted(path: Path, what: str, *, limit: int = MAX_CONFIG_BYTES,
                 secret: bool = False, trusted: bool = True) -> bytes:
    """The bytes of a small file signerd trusts: a config, a policy, a PIN.

    The one way signerd reads such a file, so that every one is read alike:

    * only a regular file, and never blocking: the path is resolved (a
      symbolic link to a config, as Kubernetes mounts them, is followed
      here, once), then opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked
      with ``fstat`` before a byte is read. A FIFO there once blocked the
      main thread, and with it SIGTERM; ``/dev/zero`` was read until
      MemoryError.
    * at most ``limit`` bytes: a longer file is refused, not truncated.
    * with ``trusted`` (the default), as sshd's StrictModes: the file must
      pass :func:`file_problem` (``secret``: not readable by group or
      others either), and every directory above it
      :func:`directory_problem`. Without it (a client's own config) only
      the first two points hold.

    Raises :class:`ConfigError`, one line: ``<what> <path>: <why>``, naming
    the file or directory at fault and its mode (``<what> <path>: cannot
    read: <strerror>`` when it cannot be opened). Never the content."""
    real = Path(os.path.realpath(path))
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what} {path}: cannot read: {os.strerror(errno.EISDIR)}")
        problem = (file_problem(st, secret=secret) if trusted else
                   None if stat.S_ISREG(st.st_mode) else
                   f"is not a regular file ({_kind_of(st.st_mode)})")
        if problem is None and trusted:
            problem = path_problem(real)
        if problem is None and st.st_size > limit:
            problem = f"is larger than {limit} bytes ({st.st_size})"
        if problem is not None:
            raise ConfigError(f"{what} {path}: {problem}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # it may grow after fstat: read at most one byte past the limit
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(f"{what} {path}: is larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def audit_location_problem(path: Path) -> str | None:
    """Why the daemon must not write its audit log at ``path``, or None.

    The path must be a regular file or not exist yet (it is created, with
    its head and rotated files, beside it), in a directory the daemon owns
    and that neither group nor others may write (else they could put a
    symbolic link or their own file at any of those names), below
    directories only root or the daemon's user can change. ``/dev/full``
    and the like are refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"{path} cannot be examined: {e.strerror}"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file ({_kind_of(st.st_mode)})"
    directory = Path(os.path.realpath(path.parent))
    try:
        owner = os.stat(directory).st_uid
    except OSError as e:
        return f"directory {directory} cannot be examined: {e.strerror}"
    if owner != os.geteuid():
        return (f"directory {directory} is owned by uid {owner}, not by signerd's user "
                f"(uid {os.geteuid()}): the audit log's directory must be signerd's own")
    return directory_problem(directory, sticky_ok=False) or path_problem(directory)


def read_toml(path: Path, what: str, *, trusted: bool = False) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into one clear ConfigError.
    Read with :func:`read_trusted` (``trusted``: its owner and mode, and its
    directories', are checked too; a client's own config is not)."""
    raw = read_trusted(path, what, trusted=trusted)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None
