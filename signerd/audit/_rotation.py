"""Rotation and resuming (see Rotation in :mod:`signerd.audit`): rotated file
names, the switch to a new file, following a file another program renamed,
where a start continues the chain (reading only the log's tail), finding a
log renamed while signerd was stopped, and finishing a rotation a crash
interrupted."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from signerd.audit._fs import (
    _fsync_dir,
    _Locked,
    _open_head,
    _open_locked,
    _quietly,
    _why,
    _write_all,
)
from signerd.audit._line import MAX_LINE_BYTES, ZERO_HASH, _parse, _read_head, head_path
from signerd.errors import ConfigError, Unavailable

# One logger for the whole package, named after its public module.
log = logging.getLogger("signerd.audit")

_TAIL_WINDOW: Final = 64 * 1024
_MAX_EXTRA: Final = 999  # rotations in one second after the first (the _NNN suffix)


def rotated_path(path: Path, when: datetime, extra: int = 0) -> Path:
    """The name a rotation at ``when`` (UTC, to the second) gives the log
    ``path``: ``audit.log`` -> ``audit.log.20261128T141503Z``, and
    ``audit.log.20261128T141503Z_001`` for the ``extra``-th further rotation
    in that second (``_`` sorts after ``.``, so after ``...Z.gz`` too)."""
    name = f"{path.name}.{when.astimezone(UTC):%Y%m%dT%H%M%S}Z"
    return path.with_name(f"{name}_{extra:03d}" if extra else name)


def _next_path(path: Path) -> Path:
    # Hidden, so that no glob for the log or its rotated files picks it up.
    return path.with_name(f".{path.name}.next")


class _Rotator:
    """The file half of rotating one log (see Rotation): choosing the rotated
    file's name and switching the path over to a new file. The chain (seq,
    prev, head) stays with :class:`~signerd.audit.AuditLog`, which encodes the
    new file's rotation record and moves on past it."""

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path = path
        self._fsync = fsync
        self._last: tuple[datetime, int] | None = None  # (second, extra): last name used

    def free_name(self) -> tuple[Path, tuple[datetime, int]]:
        """A name that sorts after every earlier one: this second's, else the
        second's next ``_NNN`` (names never run ahead of the clock, which
        logrotate's names, made from the clock, must sort after)."""
        when, extra = datetime.now(UTC).replace(microsecond=0), 0
        if self._last is not None and when <= self._last[0]:
            when, extra = self._last[0], self._last[1] + 1
        while os.path.lexists(rotated_path(self.path, when, extra)) or extra > _MAX_EXTRA:
            extra += 1
            if extra > _MAX_EXTRA:  # a thousand in one second: borrow the next second
                when, extra = when + timedelta(seconds=1), 0
        return rotated_path(self.path, when, extra), (when, extra)

    def used(self, when: tuple[datetime, int]) -> None:
        """The name :meth:`free_name` gave as ``when`` is taken: later names sort after it."""
        self._last = when

    def switch(self, line: bytes, target: Path) -> tuple[int, tuple[int, int]]:
        """Give the file at the path the name ``target`` and put a new file
        holding just ``line`` (plus its newline) at the path. Returns the new
        file's descriptor, locked, and its (st_dev, st_ino).

        Raises :class:`Unavailable` with the old file back at the path (or
        the path missing, which the next write recreates) and no stray new
        file."""
        nxt = _next_path(self.path)
        fail = f"audit log {self.path} cannot be rotated"
        try:
            if os.path.lexists(nxt):
                os.unlink(nxt)
            fd, ident = _open_locked(nxt, exclusive=True)
        except (OSError, _Locked) as e:
            raise Unavailable(f"{fail}: {nxt.name}: {_why(e)}") from None
        linked = renamed = False
        try:
            _write_all(fd, line + b"\n")
            if self._fsync:
                os.fsync(fd)
            try:
                os.link(self.path, target)  # fails if the name was taken meanwhile
                linked = True
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: a brief gap instead
                os.rename(self.path, target)
                renamed = True
            os.rename(nxt, self.path)  # the switch: nothing is undone after it
        except OSError as e:
            os.close(fd)
            # Back to the old file at the path (a path left missing is recreated
            # by the next write), and no stray new file.
            if linked:
                _quietly(os.unlink, target)
            if renamed:
                _quietly(os.rename, target, self.path)
            _quietly(os.unlink, nxt)
            raise Unavailable(f"{fail}: {_why(e)}") from None
        if self._fsync:
            try:
                _fsync_dir(self.path.parent)
            except OSError as e:
                log.warning("audit log rotated, but its directory cannot be synced",
                            extra={"fields": {"file": str(self.path), "error": _why(e)}})
        return fd, ident


def _reopen_if_replaced(path: Path, ident: tuple[int, int],
                        head: Path) -> tuple[int, tuple[int, int], int, int] | None:
    """None while the file at ``path`` is still the one open (``ident``: its
    st_dev, st_ino). Once it was removed or replaced (rotated by another
    program), opens and locks the file now at the path, creating it, and the
    head file ``head``: returns (fd, ident, head fd, size). Raises
    :class:`Unavailable` if they cannot be opened."""
    try:
        # lstat: a symbolic link put at the path is a replacement too (and
        # _open_locked then refuses it), never the file it names.
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            return None
    except OSError:
        pass
    try:
        fd, new_ident = _open_locked(path)
    except (OSError, _Locked) as e:
        raise Unavailable(f"audit log cannot be written: {path} was removed or "
                          f"replaced and cannot be recreated: {_why(e)}") from None
    try:
        head_fd = _open_head(head)
        size = os.fstat(fd).st_size
    except OSError as e:
        os.close(fd)
        raise Unavailable(f"audit log cannot be written: cannot open "
                          f"{head}: {_why(e)}") from None
    return fd, new_ident, head_fd, size


def _resume(fd: int, path: Path) -> tuple[int, _ResumeState]:
    """The size of the log ``path``, open as ``fd``, and where its chain
    continues; warns of what a start recovers from (a missing head file, a
    log renamed while signerd was stopped). Raises ConfigError as
    :func:`_resume_state`, OSError."""
    size = os.fstat(fd).st_size
    state = _resume_state(fd, size, path)
    if state.head_missing and state.seq:
        log.warning("audit head file is missing; recreating it (removal of lines at the "
                    "end of the log before now cannot be detected)",
                    extra={"fields": {"file": str(head_path(path)), "seq": state.seq}})
    if state.renamed is not None:
        log.warning("audit log was renamed while signerd was stopped; continuing its "
                    "chain in a new file", extra={"fields": {
                        "file": str(path), "previous_file": str(state.renamed),
                        "seq": state.seq + 1}})
    return size, state


def check_resumable(path: Path) -> tuple[int, str | None]:
    """What a start would find in the log at ``path``, read only: no lock,
    nothing created. Returns the seq the chain would continue from (0 for a
    new or empty log) and, when the log was renamed while signerd was
    stopped, the name of the file it continues. Raises :class:`ConfigError`
    for what would stop a start (a torn or foreign last line, a log shorter
    than its head file, an unreadable file). A log another process writes is
    read as it is."""
    nxt = _next_path(path)
    source = path if os.path.lexists(path) or not os.path.lexists(nxt) else nxt
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        fd = None
    except OSError as e:
        raise ConfigError(f"audit log {path}: cannot open: {_why(e)}") from None
    try:
        size = os.fstat(fd).st_size if fd is not None else 0
        state = _resume_state(fd, size, path)
        return state.seq, state.renamed.name if state.renamed is not None else None
    except OSError as e:
        raise ConfigError(f"audit log {path}: cannot read: {_why(e)}") from None
    finally:
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class _ResumeState:
    seq: int  # of the last line (0: a new chain)
    last: str  # hash of the last line
    head_missing: bool
    renamed: Path | None = None  # the chain's end is in this file, renamed while stopped


def _resume_state(fd: int | None, size: int, path: Path) -> _ResumeState:
    """Where the log open as ``fd`` continues; ConfigError if a start must
    not continue it."""
    seq, last = 0, ZERO_HASH
    if size:
        assert fd is not None
        seq, last = _resume_point(fd, size, path)
    hp = head_path(path)
    head = _read_head(hp)
    if isinstance(head, str):
        raise ConfigError(f"audit log {path}: {head}; run 'signerctl audit verify "
                          f"{path}' and repair or move both files before starting")
    if head is None:
        return _ResumeState(seq, last, True)
    head_seq, head_hash = head
    if seq == 0 and head_seq > 0:
        # An empty or missing log whose head names a line: renamed by another
        # program (logrotate) while signerd was stopped, if a sibling ends there.
        renamed = _find_renamed(path, head)
        if renamed is not None:
            return _ResumeState(head_seq, head_hash, False, renamed)
    if head_seq > seq or (head_seq == seq and head_hash != last):
        what = (f"ends at seq {seq} but its head file records seq {head_seq}"
                if head_seq > seq else "last line does not match its head file")
        raise ConfigError(f"audit log {path}: {what}: lines were removed or edited; run "
                          f"'signerctl audit verify {path}' before starting (to start a "
                          f"new chain, move both {path.name} and {hp.name} away)")
    return _ResumeState(seq, last, False)


_RENAMED_CANDIDATES: Final = 8  # newest siblings read when looking for a renamed log


def _find_renamed(path: Path, head: tuple[int, str]) -> Path | None:
    """The sibling ``<name>.*`` (not compressed, not the head) whose last line
    is the one ``head`` names; the most recently modified are tried first."""
    skip = {head_path(path).name, _next_path(path).name}
    try:
        entries = [e for e in os.scandir(path.parent)
                   if e.name.startswith(path.name + ".") and e.name not in skip
                   and not e.name.endswith(".gz") and e.is_file(follow_symlinks=False)]
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
    except OSError:
        return None
    for entry in entries[:_RENAMED_CANDIDATES]:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size and _resume_point(fd, size, Path(entry.path)) == head:
                return Path(entry.path)
        except (OSError, ConfigError):
            continue
        finally:
            os.close(fd)
    return None


def _finish_rotation(path: Path) -> None:
    """Complete or undo a rotation that a crash interrupted (see Rotation).
    Raises OSError, or _Locked while another process is rotating the log."""
    nxt = _next_path(path)
    try:
        fd = os.open(nxt, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Locked("another process is rotating it") from None
        first = os.pread(fd, MAX_LINE_BYTES, 0).split(b"\n", 1)[0]
        parsed = _parse(first)
        previous = parsed[2] if isinstance(parsed, tuple) else None
        old = path.with_name(previous) if previous else None
        # The old file is safe under its rotated name (a second link to the
        # path's file, or the only name left): the new file may take the path.
        done = old is not None and os.path.lexists(old) and (
            not os.path.lexists(path) or os.path.samefile(old, path))
        if done:
            os.rename(nxt, path)
        else:
            os.unlink(nxt)
        log.warning("finished an interrupted audit log rotation" if done else
                    "removed the new file of an audit log rotation that did not happen",
                    extra={"fields": {"file": str(path), "rotated_to": str(old)}})
    finally:
        os.close(fd)


def _resume_point(fd: int, size: int, path: Path) -> tuple[int, str]:
    """seq and hash of the last line, reading only the end of the file."""
    window = _TAIL_WINDOW
    while True:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        complete = data.endswith(b"\n")
        parts = (data[:-1] if complete else data).split(b"\n")
        # parts[0] may begin mid-line unless the window reaches the file's start.
        whole = parts if start == 0 else parts[1:]
        if whole or window > 2 * MAX_LINE_BYTES:
            break
        window *= 2
    if not whole:
        raise ConfigError(f"audit log {path}: the last line is longer than {MAX_LINE_BYTES} "
                          f"bytes: not an audit record; run 'signerctl audit verify {path}'")
    last = whole[-1]
    before = _parse(whole[-2]) if len(whole) > 1 else None
    where = f"the last line (byte {size - len(last) - complete}"
    where += f", after seq {before[0]})" if isinstance(before, tuple) else ")"
    parsed = _parse(last)
    if not complete or isinstance(parsed, str):
        why = ("has no newline (a torn write?)" if not complete
               else f"is not an audit record ({parsed})")
        raise ConfigError(f"audit log {path}: {where} {why}; refusing to continue the chain: run "
                          f"'signerctl audit verify {path}' and repair the file")
    return parsed[0], hashlib.sha256(last).hexdigest()
