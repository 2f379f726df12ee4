"""Hash-chained audit log: one JSON line per request, and a checker for it.

Log file
--------
Each line is one compact JSON object with sorted keys and only ASCII bytes
(``ensure_ascii``), so a value can never contain a raw newline. The caller
passes the request fields (``request_id identity peer transport operation
key_id gun role token payload_sha256 decision status latency_ms``);
:meth:`AuditLog.write` adds three more:

``time``  RFC 3339 UTC with milliseconds, ``2024-05-01T12:00:00.123Z``;
``seq``   1 for the first line of the chain, then +1 per line;
``prev``  hex SHA-256 of the previous line's exact bytes (without its
          newline); 64 zeros on the first line.

String values longer than :data:`MAX_VALUE_CHARS` are shortened to a prefix
plus their length and SHA-256, so a client cannot bloat the log through a
field it controls (such as a listing filter).

Head file
---------
A chain shows edits, deletions and reordering *inside* the file, but not
whole lines cut off its end: the shorter file is a valid chain too. So the
writer also keeps ``<log>.head``, one fixed-size line
``{"seq":N,"sha256":"<hash of line N>"}`` padded with spaces to
:data:`HEAD_SIZE` bytes. It is rewritten in place after every line with a
single ``pwrite`` at offset 0: one extra system call, no rename and no fsync,
which is cheap enough for every request. Because the head is written after
the line it names, a reader that reads the head first and the log second
never sees the head ahead of the log. :func:`verify` then requires the line
with the head's ``seq`` to exist and to hash to the head's value. A head that
*lags* the log (a crash between the two writes) is accepted.

Limits, precisely:

* The chain is not keyed. Whoever can write the log can also recompute a
  consistent chain, and whoever can write the directory can truncate the log
  and rewrite or delete the head. Tamper evidence against such an attacker
  needs an anchor kept elsewhere: the writer logs an ``audit checkpoint``
  (seq and hash) through the normal log stream when it opens, every
  ``checkpoint_every`` lines and on close, and ``verify(path,
  expect_last=...)`` checks the file ends with a given line hash.
* Without ``fsync=True`` a power loss can lose the end of the log while the
  head survives; ``verify`` then reports the tail as truncated, which is
  true: those lines are gone. With ``fsync=True`` the log is synced before the
  head is written, so the head can only lag.
* Such a power loss, or any removal of lines at the end, also stops the
  next start: :class:`AuditLog` refuses (``ConfigError``) to continue a log
  that is shorter than its head says, since continuing would overwrite the
  evidence. The operator runs ``signerctl audit verify``, then either moves
  both files away (a new chain) or deletes the head file to accept the loss.
* A missing head file is reported by ``verify`` but does not fail it; a
  malformed one does. At startup a lagging head is accepted unchecked: only
  the log's last line is read, never the whole file.

Writing
-------
One process writes a log: :class:`AuditLog` takes an exclusive ``flock`` and
refuses to start if another process holds it. Open it after any fork: a
forked child would share the lock but not the chain state, and each worker
process needs its own file. Writes are not fsynced unless ``fsync=True``. A
write that fails (disk full, file unwritable) raises
:class:`~signerd.errors.Unavailable` so the request fails closed, and the
chain does not advance; bytes of a partly written line are cut off again.
If they cannot be, the log refuses every later write until restart. If the
file is removed or renamed while open (rotation), the next write creates a
new file at the path and continues the chain in it (see Rotation); if the
new file cannot be created, that write raises ``Unavailable``.

Rotation
--------
:meth:`AuditLog.rotate` (the daemon calls it on SIGHUP) and ``max_bytes``
(``[audit] max_bytes``: the file rotates once a line takes it to that size
or more; unset, never by size) close the current file, rename it to
``<file>.<UTC time>Z`` and start a new file at the path. The name is the
rotation's time to the second, ``audit.log.20261128T141503Z``; further
rotations in the same second (or a name already taken) add ``_001``,
``_002``, ... The names sort in chain order, so ``audit.log.2* audit.log``
lists a chain oldest first, and logrotate's ``dateext`` with ``dateformat
.%Y%m%dT%H%M%SZ`` makes the same shape (its ``maxage`` expires them and
``compress`` packs them, except the rare ``_NNN`` ones;
deploy/logrotate/signerd). The new file's first line is a rotation record,
chained like any other line::

    {"operation":"audit.rotate","previous_file":"audit.log.20261128T141503Z",
     "prev":"<SHA-256 of the old file's last line>","reason":"sighup","seq":N+1,...}

so ``seq`` and ``prev`` run on across files and :func:`verify_files` checks
the files as one chain. A file that starts with a rotation record also
verifies on its own: the result says which earlier file it continues.

A log renamed while signerd was stopped (an empty or missing file whose head
names a line) is found again at the next start: the newest sibling
``<file>.*`` that ends with the head's line; the new file then starts with a
rotation record naming it. If none does, the start is refused as for any
log shorter than its head.

The switch is atomic for readers of the path: the new file is written in
full as ``.<file>.next``, the old file gets its rotated name as a second
link, and ``.<file>.next`` is renamed over the path. A crash in between
leaves ``.<file>.next``; the next start renames it into place if the old
file already has its rotated name, else deletes it. The head file keeps its
name and goes on naming the chain's last line. A file renamed or removed by
another program (logrotate without ``copytruncate``) is noticed at the next
write or rotation; the new file at the path then starts with a rotation
record whose ``previous_file`` is null (its new name is unknown). A rotation
that fails (say, the directory is not writable) is logged and the log goes
on in the current file: rotating is housekeeping, the line is the evidence.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, Literal, cast

from signerd.errors import ConfigError, Unavailable

log = logging.getLogger("signerd.audit")

ZERO_HASH: Final = "0" * 64
HEAD_SIZE: Final = 128
MAX_LINE_BYTES: Final = 1 << 20  # verify and the tail reader give up on longer lines
MAX_VALUE_CHARS: Final = 1024
ROTATE_OPERATION: Final = "audit.rotate"  # the "operation" of a rotation record
_TAIL_WINDOW: Final = 64 * 1024
_ROTATE_RETRY: Final = 5.0  # seconds before a failed size rotation is tried again
_MAX_EXTRA: Final = 999  # rotations in one second after the first (the _NNN suffix)
_RESERVED: Final = frozenset({"time", "seq", "prev"})
_HEX: Final = frozenset("0123456789abcdef")
# Compact, sorted keys, ASCII only (no raw newline or odd byte can reach the file);
# NaN is not JSON, and anything else unusual is written as its str().
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                   allow_nan=False, default=str)

Problem = Literal["edited", "deleted", "reordered", "truncated", "missing", "head", "anchor",
                  "unreadable"]


def head_path(path: Path) -> Path:
    """Where the head file of the log ``path`` lives: ``<path>.head``."""
    return path.with_name(path.name + ".head")


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


class AuditLog:
    """Appends hash-chained JSON lines to ``path``; thread-safe.

    ``max_bytes`` (None: never) rotates the file once a line takes it to
    that many bytes or more; it may also be set after opening.

    Raises :class:`ConfigError` at startup when the file cannot be opened, is
    locked by another process, ends in a line that is not a complete record
    (a torn write), or is shorter than its head file says.
    """

    def __init__(self, path: Path, *, fsync: bool = False, checkpoint_every: int = 1000,
                 max_bytes: int | None = None) -> None:
        self.path = path
        self.head_path = head_path(path)
        self._fsync = fsync
        self._checkpoint_every = max(1, checkpoint_every)
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._head_warned = False
        self._fd: int | None = None
        self._head_fd: int | None = None
        self._size = 0  # bytes in the current file
        self._max_bytes: int | None = None
        self.max_bytes = max_bytes
        self._rotate_after = 0.0  # monotonic time before which a size rotation is not retried
        self._last_rotation: tuple[datetime, int] | None = None  # (second, extra): last name
        # (reason, previous file) of a rotation record the current file still needs
        self._pending: tuple[str, str | None] | None = None
        try:
            _finish_rotation(path)
            self._fd, self._ident = _open_locked(path)
        except (OSError, _Locked) as e:
            raise ConfigError(f"audit log {path}: cannot open: {_why(e)}") from None
        try:
            self._seq, self._last = self._resume()
            self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._close_fds()
            raise ConfigError(f"audit log {path}: cannot open: {_why(e)}") from None
        except ConfigError:
            self._close_fds()
            raise
        self._write_head()
        try:
            os.ftruncate(self._head_fd, HEAD_SIZE)  # drop anything past the fixed-size record
        except OSError:
            pass  # a longer head still parses: only trailing padding follows the record
        try:
            self._write_pending()  # the link to a file renamed while stopped, at once
        except Unavailable as e:
            self._close_fds()
            raise ConfigError(f"audit log {path}: {e}") from None
        self._checkpoint("audit log opened")

    @property
    def seq(self) -> int:
        """Sequence number of the last line written (0 for an empty log)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """SHA-256 of the last line written (:data:`ZERO_HASH` for an empty log)."""
        return self._last

    @property
    def max_bytes(self) -> int | None:
        """Size in bytes at which the file rotates (None: never by size)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError(f"max_bytes must be at least 1, got {value}")
        self._max_bytes = value

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record, adding ``time``, ``seq`` and ``prev``.

        Raises :class:`Unavailable` if the line cannot be written; the chain
        then stays where it was. ``ValueError`` means a caller bug: a
        reserved key, or a value JSON cannot hold. A size rotation that
        fails after the line is written is logged, not raised.
        """
        self.write_many((record,))

    def write_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append several records as consecutive lines of the chain with one
        ``write`` (and one head update): a group commit for the items of a
        streaming call. All or none: if the write fails, no line of the group
        stays and the chain does not move (raises :class:`Unavailable`).
        ``ValueError`` as for :meth:`write`, before anything is written."""
        docs = []
        for record in records:
            reserved = _RESERVED.intersection(record)
            if reserved:
                raise ValueError(f"audit record must not set {sorted(reserved)}; the log adds them")
            doc = dict(record)
            for k, v in doc.items():
                if isinstance(v, str) and len(v) > MAX_VALUE_CHARS:
                    doc[k] = _shorten(v)
            docs.append(doc)
        if not docs:
            return
        with self._lock:
            self._check_writable()
            self._follow_path()
            self._write_pending()
            if len(docs) == 1:
                self._commit(self._encode(docs[0]))
            else:
                self._commit_group(docs)
            if self._max_bytes is not None and self._size >= self._max_bytes:
                self._rotate_for_size()

    def rotate(self, reason: str = "sighup") -> Path | None:
        """Close the current file, rename it and start a new one (see Rotation).

        Returns the rotated file's new path; None when there was nothing to
        rotate (the file is empty) or another program had already renamed
        the file (then the chain continues in a new file at the path, as it
        would at the next write). Raises :class:`Unavailable` when the log
        is closed or broken or the rotation fails; the log then goes on in
        the current file.
        """
        with self._lock:
            self._check_writable()
            if self._follow_path():
                self._write_pending()
                return None
            return self._rotate(reason)

    def close(self) -> None:
        """Update the head, log a final checkpoint and close. Idempotent."""
        with self._lock:
            if self._fd is None:
                return
            self._write_head()
            self._checkpoint("audit log closed")
            self._close_fds()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals; every method below runs with self._lock held or in __init__

    def _check_writable(self) -> None:
        if self._fd is None:
            raise Unavailable("audit log cannot be written: it is closed")
        if self._broken is not None:
            raise Unavailable(f"audit log cannot be written: {self._broken}")

    def _encode(self, doc: dict[str, Any]) -> bytes:
        """The next line (without newline) for ``doc``; the chain does not move."""
        return _encode_line(doc, _now(), self._seq + 1, self._last)

    def _commit(self, line: bytes) -> None:
        """Append ``line`` to the current file and move the chain past it."""
        self._append(line + b"\n")
        self._size += len(line) + 1
        self._seq, self._last = self._seq + 1, hashlib.sha256(line).hexdigest()
        self._write_head()
        if self._seq % self._checkpoint_every == 0:
            self._checkpoint("audit checkpoint")

    def _commit_group(self, docs: list[dict[str, Any]]) -> None:
        """Encode ``docs`` as a run of chained lines, append them with one
        write, then move the chain past all of them (nothing moves if the
        write fails). A checkpoint falling inside the run is logged once,
        for its last line."""
        seq, last, when = self._seq, self._last, _now()
        lines = []
        for doc in docs:
            line = _encode_line(doc, when, seq + 1, last)
            lines.append(line)
            seq, last = seq + 1, hashlib.sha256(line).hexdigest()
        data = b"\n".join(lines) + b"\n"
        self._append(data)
        self._size += len(data)
        crossed = seq // self._checkpoint_every > self._seq // self._checkpoint_every
        self._seq, self._last = seq, last
        self._write_head()
        if crossed:
            self._checkpoint("audit checkpoint")

    def _rotation_line(self, reason: str, previous: str | None) -> bytes:
        return self._encode({"operation": ROTATE_OPERATION, "reason": reason,
                             "previous_file": previous})

    def _write_pending(self) -> None:
        """Start a file that another program put at the path with its rotation
        record. Raises Unavailable (the record stays pending)."""
        if self._pending is not None:
            reason, previous = self._pending
            self._commit(self._rotation_line(reason, previous))
            self._pending = None

    def _resume(self) -> tuple[int, str]:
        assert self._fd is not None
        self._size = os.fstat(self._fd).st_size
        state = _resume_state(self._fd, self._size, self.path)
        if state.head_missing and state.seq:
            log.warning("audit head file is missing; recreating it (removal of lines at the "
                        "end of the log before now cannot be detected)",
                        extra={"fields": {"file": str(self.head_path), "seq": state.seq}})
        if state.renamed is not None:
            self._pending = ("renamed", state.renamed.name)
            log.warning("audit log was renamed while signerd was stopped; continuing its "
                        "chain in a new file", extra={"fields": {
                            "file": str(self.path), "previous_file": str(state.renamed),
                            "seq": state.seq + 1}})
        return state.seq, state.last

    def _follow_path(self) -> bool:
        """Reopen the path if the file was removed or replaced (rotated by
        another program); True if it was. Raises Unavailable."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                return False
        except OSError:
            pass
        try:
            fd, ident = _open_locked(self.path)
        except (OSError, _Locked) as e:
            raise Unavailable(f"audit log cannot be written: {self.path} was removed or "
                              f"replaced and cannot be recreated: {_why(e)}") from None
        try:
            head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise Unavailable(f"audit log cannot be written: cannot open "
                              f"{self.head_path}: {_why(e)}") from None
        self._close_fds()
        self._fd, self._ident, self._head_fd, self._size = fd, ident, head_fd, size
        self._pending = ("renamed", None)
        log.warning("audit log file was removed or replaced; continuing the chain in a new file",
                    extra={"fields": {"file": str(self.path), "seq": self._seq + 1}})
        return True

    def _rotate_for_size(self) -> None:
        now = time.monotonic()
        if now < self._rotate_after:
            return
        try:
            self._rotate("max_bytes")
        except Unavailable as e:
            self._rotate_after = now + _ROTATE_RETRY
            log.error("audit log rotation failed; writing on in the current file",
                      extra={"fields": {"file": str(self.path), "error": str(e)}})

    def _free_name(self) -> tuple[Path, tuple[datetime, int]]:
        """A name that sorts after every earlier one: this second's, else the
        second's next ``_NNN`` (names never run ahead of the clock, which
        logrotate's names, made from the clock, must sort after)."""
        when, extra = datetime.now(UTC).replace(microsecond=0), 0
        if self._last_rotation is not None and when <= self._last_rotation[0]:
            when, extra = self._last_rotation[0], self._last_rotation[1] + 1
        while os.path.lexists(rotated_path(self.path, when, extra)) or extra > _MAX_EXTRA:
            extra += 1
            if extra > _MAX_EXTRA:  # a thousand in one second: borrow the next second
                when, extra = when + timedelta(seconds=1), 0
        return rotated_path(self.path, when, extra), (when, extra)

    def _rotate(self, reason: str) -> Path | None:
        assert self._fd is not None
        if self._size == 0:
            return None
        target, when = self._free_name()
        line = self._rotation_line(reason, target.name)
        nxt = _next_path(self.path)
        fail = f"audit log {self.path} cannot be rotated"
        try:
            if os.path.lexists(nxt):
                os.unlink(nxt)
            fd, ident = _open_locked(nxt)
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
        os.close(self._fd)  # releases the old file's flock
        self._fd, self._ident, self._size = fd, ident, len(line) + 1
        self._seq, self._last = self._seq + 1, hashlib.sha256(line).hexdigest()
        self._last_rotation = when
        self._write_head()
        log.info("audit log rotated", extra={"fields": {
            "file": str(self.path), "rotated_to": str(target), "reason": reason,
            "seq": self._seq, "sha256": self._last}})
        if self._seq % self._checkpoint_every == 0:
            self._checkpoint("audit checkpoint")
        return target

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            # One write() normally; loop because a short write is allowed.
            while written < len(data):
                written += os.write(self._fd, data[written:])
            if self._fsync:
                os.fsync(self._fd)
        except OSError as e:
            self._undo(written)
            raise Unavailable(f"audit log cannot be written: {self.path}: {_why(e)}") from None

    def _undo(self, written: int) -> None:
        """Cut a partly written (or unsynced) line off the end again."""
        if not written:
            return
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
        except OSError as e:
            # The file now ends in bytes the chain does not account for.
            self._broken = (f"{self.path} ends in a partly written line that could not be "
                            f"removed ({_why(e)}); restart after 'signerctl audit verify'")
            log.error("audit log is broken; refusing further writes",
                      extra={"fields": {"file": str(self.path), "error": _why(e)}})

    def _write_head(self) -> None:
        if self._head_fd is None:
            return
        try:
            os.pwrite(self._head_fd, _head_record(self._seq, self._last), 0)
        except OSError as e:
            # The line itself is safely in the log: a stale head only lags,
            # which verify accepts. Warn once, not on every request.
            if not self._head_warned:
                self._head_warned = True
                log.warning("audit head file cannot be updated; tail truncation will not be "
                            "detectable", extra={"fields": {"file": str(self.head_path),
                                                            "error": _why(e)}})
        else:
            self._head_warned = False

    def _checkpoint(self, msg: str) -> None:
        log.info(msg, extra={"fields": {"file": str(self.path), "seq": self._seq,
                                        "sha256": self._last}})

    def _close_fds(self) -> None:
        for fd in (self._fd, self._head_fd):
            if fd is not None:
                try:
                    os.close(fd)  # also releases the flock
                except OSError:
                    pass
        self._fd = self._head_fd = None


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
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
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
        fd = os.open(nxt, os.O_RDONLY | os.O_CLOEXEC)
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


def _now() -> str:
    # isoformat() is several times faster than strftime() on this hot path.
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _encode_line(doc: dict[str, Any], when: str, seq: int, prev: str) -> bytes:
    """``doc`` with ``time``, ``seq`` and ``prev`` set, as one line of ASCII
    JSON without its newline. ValueError: not serialisable, or too long."""
    doc.update(time=when, seq=seq, prev=prev)
    try:
        line = _ENCODER.encode(doc).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ValueError(f"audit record cannot be serialised: {e}") from None
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"audit record is {len(line)} bytes; limit {MAX_LINE_BYTES}")
    return line


def _shorten(value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[:256]}...[{len(value)} chars, sha256 {digest}]"


def _head_record(seq: int, last: str) -> bytes:
    text = f'{{"seq":{seq},"sha256":"{last}"}}'
    return text.ljust(HEAD_SIZE - 1).encode("ascii") + b"\n"


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """(seq, sha256), None if there is no head file, or why it is unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"head file {path.name} cannot be read: {_why(e)}"
    try:
        doc = json.loads(raw.decode("ascii"))
        seq, sha = doc["seq"], doc["sha256"]
        if set(doc) != {"seq", "sha256"} or type(seq) is not int or seq < 0 or not _is_hash(sha):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return f"head file {path.name} is malformed (expected {{\"seq\":N,\"sha256\":HEX}})"
    return seq, sha


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _parse(line: bytes) -> tuple[int, str, str | None] | str:
    """(seq, prev, rotation) of a record line, or why it is not one.

    ``rotation`` is None for a request line; for a rotation record, the
    name of the file it continues ("" when unknown)."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(doc, dict):
        return "not a JSON object"
    seq, prev = doc.get("seq"), doc.get("prev")
    if type(seq) is not int or seq < 1:
        return "no valid 'seq'"
    if not isinstance(prev, str) or not _is_hash(prev):
        return "no valid 'prev'"
    rotation = None
    if doc.get("operation") == ROTATE_OPERATION:
        previous = doc.get("previous_file")
        # A bare file name only: a rotation record never points elsewhere.
        rotation = previous if isinstance(previous, str) and "/" not in previous else ""
    return seq, prev, rotation


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


# -- verification


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify` or :func:`verify_files`. Lines are numbered
    from 1 in each file.

    ``lines`` counts the complete lines of every file read; ``path`` is the
    file the fault is in (the last file when there is none);
    ``first_bad_line`` is the first line edited, removed (the position where
    lines are missing), reordered or truncated, or None when the fault has
    no line. ``files`` names every file checked, in the order given.
    """

    ok: bool
    lines: int
    first_bad_line: int | None
    reason: str
    problem: Problem | None = None
    path: str = ""
    files: tuple[str, ...] = field(default=(), compare=False)


def _lines(f: IO[bytes]) -> Iterator[bytes | None]:
    """Raw lines with their newline; None for a line over the size limit."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of it
                raw = f.readline(MAX_LINE_BYTES + 1)
            yield None
            continue
        yield raw


def _open_log(path: Path) -> IO[bytes]:
    # logrotate's "compress" gzips rotated files; anything else is read as is.
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def verify(path: Path, expect_last: str | None = None, *, head: Path | None = None) -> VerifyResult:
    """Check the chain of the log at ``path`` and name the first bad line.

    The head file (``head``, default ``<path>.head``) is used when present to
    detect lines removed from the end. ``expect_last`` is the hex SHA-256 of
    the line the file must end with (an anchor kept elsewhere). A file that
    starts with a rotation record is checked from there on; the result says
    which file it continues.
    """
    return verify_files([path], expect_last, head=head)


def verify_files(paths: Sequence[Path], expect_last: str | None = None, *,
                 head: Path | None = None) -> VerifyResult:
    """Check rotated files, oldest first, as one chain (see Rotation).

    Each file must continue the one before it: its first line's ``prev`` is
    the hash of the previous file's last line and its ``seq`` the next one.
    The result names the file and line of the first fault: a line edited,
    removed or reordered inside a file; lines cut off the end of a file (the
    next file's rotation record names it as the file it continues); a file
    missing between two others; files out of order. The head file (default:
    the last file's ``<file>.head``) and ``expect_last`` apply to the end of
    the whole chain. Files ending in ``.gz`` are read through gzip.
    Raises ValueError for an empty ``paths``.
    """
    if not paths:
        raise ValueError("verify_files needs at least one file")
    names = tuple(str(p) for p in paths)
    heads = [p for p in paths if p.name.endswith(".head")]
    if heads:  # a glob such as audit.log* picks them up
        return VerifyResult(False, 0, None, f"{heads[0]} is a head file, not a log: give the "
                            "log files only (audit.log.2* audit.log)", "head", str(heads[0]),
                            names)
    if expect_last is not None:
        expect_last = expect_last.strip().lower()
        if not _is_hash(expect_last):
            return VerifyResult(False, 0, None, "the expected last line hash must be 64 hex "
                                "digits (a SHA-256)", "anchor", names[-1], names)
    # Head first, logs second: the writer updates the head after the line, so
    # a live log always holds at least what this head names.
    anchor = _read_head(head if head is not None else head_path(paths[-1]))
    if isinstance(anchor, str):
        return VerifyResult(False, 0, None, anchor, "head", names[-1], names)
    chain = _Chain(names, anchor, expect_last)
    for i, path in enumerate(paths):
        try:
            with _open_log(path) as f:
                chain.read(i, f)
        except (OSError, EOFError) as e:
            return VerifyResult(False, chain.total, None, f"cannot read: {_why(e)}",
                                "unreadable", names[i], names)
    return chain.result()


class _Fail(Exception):
    def __init__(self, file: int, line: int | None, reason: str, problem: Problem,
                 missing: range | None = None) -> None:
        super().__init__(reason)
        self.file, self.line, self.reason, self.problem = file, line, reason, problem
        self.missing = missing


class _Chain:
    """The state of a verification, carried from one file to the next."""

    def __init__(self, names: tuple[str, ...], anchor: tuple[int, str] | None,
                 expect_last: str | None) -> None:
        self.names, self.anchor, self.expect_last = names, anchor, expect_last
        self.total = 0  # complete lines in every file read so far
        self.counts = [0] * len(names)  # complete lines per file
        self.prev_hash, self.prev_seq = ZERO_HASH, 0
        self.prev_at: tuple[int, int] | None = None  # (file, line) of the last good line
        self.start_note = ""  # set when the first file continues one not given
        self.anchor_at: tuple[int, int] | None = None
        self.anchor_ok = True
        self.expect_at: tuple[int, int] | None = None
        self.fail: _Fail | None = None

    def read(self, i: int, f: IO[bytes]) -> None:
        n = 0
        for raw in _lines(f):
            if raw is not None and not raw.endswith(b"\n"):
                # The end of the file, in the middle of a line.
                if self.fail is None:
                    self.fail = _Fail(i, n + 1, "line incomplete (no newline at the end of the "
                                      "file): truncated write", "truncated")
                break
            n += 1
            self.total += 1
            self.counts[i] = n
            if self.fail is not None:
                # Keep counting; for a seq gap, look for the missing seqs further on.
                if raw is not None and self.fail.missing is not None:
                    self._look_for_missing(i, n, _parse(raw[:-1]))
                continue
            if raw is None:
                self.fail = _Fail(i, n, f"line edited (longer than {MAX_LINE_BYTES} bytes)",
                                  "edited")
                continue
            line = raw[:-1]
            parsed = _parse(line)
            if isinstance(parsed, str):
                self.fail = _Fail(i, n, f"line edited (not an audit record: {parsed})", "edited")
                continue
            seq, prev, rotation = parsed
            if self.prev_at is None and rotation is not None and seq > 1:
                # The first file continues one that was not given (expired, or
                # simply not asked for): the chain is checked from here on.
                self.prev_hash, self.prev_seq = prev, seq - 1
                self.start_note = (f"starts at seq {seq}, continuing "
                                   f"{rotation or 'a file renamed by another program'}, "
                                   "which was not checked; ")
            linked, in_order = prev == self.prev_hash, seq == self.prev_seq + 1
            if not (linked and in_order):
                self.fail = self._classify(i, n, seq, rotation, linked, in_order)
                continue
            self.prev_hash, self.prev_seq = hashlib.sha256(line).hexdigest(), seq
            self.prev_at = (i, n)
            if self.anchor is not None and seq == self.anchor[0]:
                self.anchor_at, self.anchor_ok = (i, n), self.prev_hash == self.anchor[1]
            if self.expect_last is not None and self.prev_hash == self.expect_last:
                self.expect_at = (i, n)

    def _look_for_missing(self, i: int, n: int, later: tuple[int, str, str | None] | str) -> None:
        fail = self.fail
        assert fail is not None and fail.missing is not None
        if not isinstance(later, tuple) or later[0] not in fail.missing:
            return
        here = f"seq {fail.missing.stop}"
        if i == fail.file:
            self.fail = _Fail(fail.file, fail.line, f"lines reordered ({here} here, but seq "
                              f"{later[0]} appears later, at line {n})", "reordered")
        elif n == 1 and fail.line == 1:
            self.fail = _Fail(fail.file, 1, f"files out of order: {self.names[i]} (from seq "
                              f"{later[0]}) must come before {self.names[fail.file]} (from "
                              f"{here})", "reordered")
        else:
            self.fail = _Fail(fail.file, fail.line, f"lines reordered ({here} here, but seq "
                              f"{later[0]} appears later, in {self.names[i]} at line {n})",
                              "reordered")

    def _classify(self, i: int, n: int, seq: int, rotation: str | None, linked: bool,
                  in_order: bool) -> _Fail:
        """Name what happened at line ``n`` of file ``i``, the first line whose
        links do not hold."""
        prev_seq, expected = self.prev_seq, self.prev_seq + 1
        at_start = n == 1 and self.prev_at is not None  # the first line after another file
        if linked:
            # Its prev still hashes the line before, so nothing between was
            # removed: this line's own seq was changed.
            return _Fail(i, n, f"line edited (seq is {seq}, expected {expected})", "edited")
        if in_order:
            if self.prev_at is None:
                return _Fail(i, n, "line edited (the first line's prev is not 64 zeros)",
                             "edited")
            # Right seq, wrong prev: the line before changed after this one was written.
            if at_start and self.prev_at is not None:
                f, line = self.prev_at
                return _Fail(f, line, f"line edited (hash does not match the prev of "
                             f"{self.names[i]} line 1)", "edited")
            return _Fail(i, n - 1, f"line edited (hash does not match line {n}'s prev)", "edited")
        if seq > expected:
            missing = range(expected, seq)
            if self.prev_at is None:
                what = (f"the file starts at seq {seq}: the first {seq - 1} line(s) were "
                        "removed, or it continues a rotated log (give the files before it "
                        "first)")
                return _Fail(i, n, what, "deleted", missing)
            if not at_start:
                return _Fail(i, n, f"line(s) removed before this line (seq jumps from "
                             f"{prev_seq} to {seq})", "deleted", missing)
            before = self.names[self.prev_at[0]]
            if rotation and _base_name(before) == rotation:
                # It names the file before it, which lost lines at its end.
                return _Fail(self.prev_at[0], self.prev_at[1] + 1,
                             f"lines missing at the end: truncated ({before} ends at seq "
                             f"{prev_seq}; {self.names[i]} continues it from seq {seq - 1})",
                             "truncated")
            gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
            names = f"{rotation} is" if rotation else "a file is"
            return _Fail(i, 1, f"{names} missing ({gap}): {self.names[i]} starts at seq {seq} "
                         f"but {before} ends at seq {prev_seq}", "missing", missing)
        if at_start and self.prev_at is not None:
            return _Fail(i, 1, f"files out of order or repeated: {self.names[i]} starts at seq "
                         f"{seq}, but {self.names[self.prev_at[0]]} before it ends at seq "
                         f"{prev_seq}", "reordered")
        return _Fail(i, n, f"lines reordered or duplicated (seq {seq} after seq {prev_seq})",
                     "reordered")

    def result(self) -> VerifyResult:
        names, last = self.names, len(self.names) - 1

        def bad(at: tuple[int, int | None], reason: str, problem: Problem) -> VerifyResult:
            return VerifyResult(False, self.total, at[1], reason, problem, names[at[0]], names)

        if self.fail is not None:
            return bad((self.fail.file, self.fail.line), self.fail.reason, self.fail.problem)
        end = (last, self.counts[last] + 1)  # just past the last line
        if self.anchor is not None:
            head_seq = self.anchor[0]
            if self.anchor_at is not None and not self.anchor_ok:
                return bad(self.anchor_at, "line edited (its hash does not match the head "
                           f"file's, seq {head_seq})", "edited")
            if head_seq > self.prev_seq:
                return bad(end, f"lines missing at the end: truncated (the file ends at seq "
                           f"{self.prev_seq}; the head file records seq {head_seq})", "truncated")
        if self.expect_last is not None and self.expect_last != self.prev_hash:
            if self.expect_at is not None:
                f, line = self.expect_at
                return bad((f, line + 1), f"lines were added after the expected last line "
                           f"(line {line})", "anchor")
            return bad((last, None), "the expected last line is not in the file: truncated or "
                       "rewritten", "anchor")
        if self.anchor is None:
            note = "no head file, so lines removed from the end cannot be detected"
        elif self.anchor[0] < self.prev_seq:
            note = f"head file lags at seq {self.anchor[0]} (accepted)"
        else:
            note = f"end matches the head file (seq {self.anchor[0]})"
        if self.expect_last is not None:
            note += "; ends with the expected line"
        across = f" across {len(names)} files" if len(names) > 1 else ""
        return VerifyResult(True, self.total, None, f"chain intact{across}; {self.start_note}"
                            f"{note}", None, names[last], names)


def _base_name(path: str) -> str:
    """A file's name as a rotation record names it (without a .gz suffix)."""
    return Path(path).name.removesuffix(".gz")


def format_result(result: VerifyResult) -> str:
    """One line for people, e.g. ``audit.log: chain broken at line 17: line edited (...)``;
    several files: ``audit.log.20261128T141503Z .. audit.log: OK: 3 files, ...``."""
    if result.ok:
        if len(result.files) > 1:
            return (f"{result.files[0]} .. {result.files[-1]}: OK: {len(result.files)} files, "
                    f"{result.lines} lines, {result.reason}")
        return f"{result.path}: OK: {result.lines} lines, {result.reason}"
    if result.first_bad_line is not None:
        return f"{result.path}: chain broken at line {result.first_bad_line}: {result.reason}"
    return f"{result.path}: verification failed: {result.reason}"
