"""Writing: :class:`AuditLog` appends records as chained lines, one or a
group per ``write``, keeps the head file current and fails closed (see
Writing in :mod:`signerd.audit`). Naming and switching files on rotation, and
where a start resumes, are in :mod:`signerd.audit._rotation`; the raw writes
to the open log and head files in :mod:`signerd.audit._files`."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

from signerd.audit._files import _LogFiles
from signerd.audit._fs import _free_bytes, _Locked, _open_head, _open_locked, _why
from signerd.audit._line import (
    _RESERVED,
    MAX_VALUE_CHARS,
    ROTATE_OPERATION,
    _encode_line,
    _now,
    _shorten,
    head_path,
)
from signerd.audit._rotation import (
    _finish_rotation,
    _reopen_if_replaced,
    _resume,
    _Rotator,
)
from signerd.errors import ConfigError, Unavailable

# One logger for the whole package, named after its public module.
log = logging.getLogger("signerd.audit")

_ROTATE_RETRY: Final = 5.0  # seconds before a failed size rotation is tried again
# The "operation" of the line :meth:`AuditLog.probe` writes once the log can
# be written again after a failure: the gap in the log is on record.
RESUME_OPERATION: Final = "audit.resume"
# Free bytes the log's file system needs before a probe after a failed write
# tries again: room for dozens of lines, so that readiness does not flap on a
# disk whose last few bytes take the probe's short line but not a request's.
_HEADROOM: Final = 64 * 1024

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _watched(method: Callable[Concatenate[AuditLog, _P], _R]
             ) -> Callable[Concatenate[AuditLog, _P], _R]:
    """Keep :attr:`AuditLog.failure` current around a write: set when the
    write raises Unavailable, cleared when one writes a line (an empty group
    proves nothing)."""
    def wrapper(self: AuditLog, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        before = self._seq
        try:
            result = method(self, *args, **kwargs)
        except Unavailable as e:
            if self._writes.set(str(e)) and self.on_change is not None:
                self.on_change()
            raise
        # The hot path reads one attribute and takes no lock.
        if (self._writes.reason is not None and self._seq != before
                and self._writes.set(None) and self.on_change is not None):
            self.on_change()
        return result
    functools.update_wrapper(wrapper, method)
    return wrapper


class _WriteState:
    """Why the log's last write failed (``reason``; None: it succeeded, or
    none was made yet) and since when (RFC 3339)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since = ""
        self._lock = threading.Lock()

    def set(self, reason: str | None) -> bool:
        """Record the outcome of a write; True if it flipped between failing and not."""
        with self._lock:
            changed = (reason is None) != (self.reason is None)
            if changed and reason is not None:
                self.since = _now()
            self.reason = reason
            return changed

    def retry(self, write: Callable[[Mapping[str, Any]], None], path: Path) -> bool:
        """After a failure, write the line that records it (see
        :meth:`AuditLog.probe`) with ``write``; True if it was written."""
        with self._lock:
            failure, since = self.reason, self.since
        if failure is None:
            return True
        try:
            write({"operation": RESUME_OPERATION, "failure": failure, "failed_since": since})
        except Unavailable:
            return False
        log.warning("audit log can be written again",
                    extra={"fields": {"file": str(path), "failed_since": since}})
        return True


class TreeSink(Protocol):
    """What keeps the log's Merkle tree (:class:`signerd.audit.Checkpointer`)."""

    def open(self, path: Path, seq: int, last: str) -> None:
        """Check the tree against the log (which ends at ``seq``, its last line
        hashing to ``last``) before any line is written; ConfigError refuses."""

    def append(self, lines: Sequence[bytes]) -> None:
        """Lines just committed (without newlines), in chain order."""


class AuditLog:
    """Appends hash-chained JSON lines to ``path``; thread-safe.

    ``max_bytes`` (None: never) rotates the file once a line takes it to
    that many bytes or more; it may also be set after opening.

    Raises :class:`ConfigError` at startup when the file cannot be opened, is
    locked by another process, ends in a line that is not a complete record
    (a torn write), or is shorter than its head file says.
    """

    def __init__(self, path: Path, *, fsync: bool = False, checkpoint_every: int = 1000,
                 max_bytes: int | None = None, tree: TreeSink | None = None) -> None:
        self.path = path
        self._tree = tree
        self.head_path = head_path(path)
        self._checkpoint_every = max(1, checkpoint_every)
        self._lock = threading.Lock()
        self._files = _LogFiles(path, self.head_path, fsync)
        self._max_bytes: int | None = None
        self.max_bytes = max_bytes
        self._rotate_after = 0.0  # monotonic time before which a size rotation is not retried
        self._rotator = _Rotator(path, fsync)
        self._writes = _WriteState()
        # Called (on the writing thread) when writes start or stop failing.
        self.on_change: Callable[[], None] | None = None
        # (reason, previous file) of a rotation record the current file still needs
        self._pending: tuple[str, str | None] | None = None
        try:
            _finish_rotation(path)
            self._files.fd, self._files.ident = _open_locked(path)
        except (OSError, _Locked) as e:
            raise ConfigError(f"audit log {path}: cannot open: {_why(e)}") from None
        try:
            self._files.size, state = _resume(self._files.fd, path)
            self._seq, self._last = state.seq, state.last
            if state.renamed is not None:
                self._pending = ("renamed", state.renamed.name)
            self._files.head_fd = _open_head(self.head_path)
            self._write_head()  # before the tree: one that fails leaves a head a start reads
            if tree is not None:
                tree.open(path, self._seq, self._last)
        except OSError as e:
            self._files.close()
            raise ConfigError(f"audit log {path}: cannot open: {_why(e)}") from None
        except BaseException:
            self._files.close()
            raise
        self._files.trim_head()
        try:
            self._write_pending()  # the link to a file renamed while stopped, at once
        except Unavailable as e:
            self._files.close()
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

    @property
    def failure(self) -> str | None:
        """Why the log cannot be written now, or None: the reason its last
        write failed until a write succeeds again (:meth:`probe` tries one),
        and for good once the log is broken or closed. What readiness
        reports (signerd.server.app)."""
        why = self._files.unwritable()
        return why if why is not None else self._writes.reason

    def probe(self) -> bool:
        """After a failed write, try one again: a line that records the gap
        (``operation`` :data:`RESUME_OPERATION`, the failure and since
        when), once its file system has some room (64 KiB). True if the log
        can be written now. For the health loop: a
        daemon that is not ready gets no requests, whose lines would show
        that the disk has space again."""
        if self._writes.reason is not None and _free_bytes(self.path.parent) < _HEADROOM:
            return False
        return self._writes.retry(self.write, self.path) and self.failure is None

    @_watched
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
            if self._max_bytes is not None and self._files.size >= self._max_bytes:
                self._rotate_for_size()

    def sync(self) -> int:
        """Make every line written so far durable (fsync); returns the seq of
        the last of them. Lines of files rotated away were synced as they
        were closed (with a tree). Raises :class:`Unavailable`."""
        with self._lock:
            self._check_writable()
            assert self._files.fd is not None
            seq, fd = self._seq, os.dup(self._files.fd)
        try:
            os.fsync(fd)
        except OSError as e:
            raise Unavailable(f"audit log cannot be synced: {self.path}: {_why(e)}") from None
        finally:
            os.close(fd)
        return seq

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
            if self._files.fd is None:
                return
            self._write_head()
            self._checkpoint("audit log closed")
            self._files.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals; every method below runs with self._lock held or in __init__

    def _check_writable(self) -> None:
        why = self._files.unwritable()
        if why is not None:
            raise Unavailable(why)

    def _encode(self, doc: dict[str, Any]) -> bytes:
        """The next line (without newline) for ``doc``; the chain does not move."""
        return _encode_line(doc, _now(), self._seq + 1, self._last)

    def _commit(self, line: bytes) -> None:
        """Append ``line`` to the current file and move the chain past it."""
        self._files.append(line + b"\n")
        self._files.size += len(line) + 1
        self._seq, self._last = self._seq + 1, hashlib.sha256(line).hexdigest()
        if self._tree is not None:
            self._tree.append((line,))
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
        self._files.append(data)
        self._files.size += len(data)
        crossed = seq // self._checkpoint_every > self._seq // self._checkpoint_every
        self._seq, self._last = seq, last
        if self._tree is not None:
            self._tree.append(lines)
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

    def _follow_path(self) -> bool:
        """Reopen the path if the file was removed or replaced (rotated by
        another program); True if it was. Raises Unavailable."""
        opened = _reopen_if_replaced(self.path, self._files.ident, self.head_path)
        if opened is None:
            return False
        self._sync_before_close()
        self._files.close()
        self._files.fd, self._files.ident, self._files.head_fd, self._files.size = opened
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

    def _rotate(self, reason: str) -> Path | None:
        assert self._files.fd is not None
        if self._files.size == 0:
            return None
        target, when = self._rotator.free_name()
        line = self._rotation_line(reason, target.name)
        fd, ident = self._rotator.switch(line, target)
        self._sync_before_close()
        os.close(self._files.fd)  # releases the old file's flock
        self._files.fd, self._files.ident, self._files.size = fd, ident, len(line) + 1
        self._seq, self._last = self._seq + 1, hashlib.sha256(line).hexdigest()
        if self._tree is not None:
            self._tree.append((line,))
        self._rotator.used(when)
        self._write_head()
        log.info("audit log rotated", extra={"fields": {
            "file": str(self.path), "rotated_to": str(target), "reason": reason,
            "seq": self._seq, "sha256": self._last}})
        if self._seq % self._checkpoint_every == 0:
            self._checkpoint("audit checkpoint")
        return target

    def _write_head(self) -> None:
        self._files.write_head(self._seq, self._last)

    def _checkpoint(self, msg: str) -> None:
        log.info(msg, extra={"fields": {"file": str(self.path), "seq": self._seq,
                                        "sha256": self._last}})

    def _sync_before_close(self) -> None:
        """With a tree, a checkpoint may only cover synced lines, and
        :meth:`sync` reaches the current file only: sync a file leaving."""
        if self._tree is not None:
            self._files.sync_leaving()
