"""The files an :class:`~signerd.audit.AuditLog` holds open: the current log
file (its descriptor, flock identity and size) and the head file, with the
raw writes to them. Appending cuts a partly written line off again, or marks
the log broken when it cannot; the chain itself (seq, hash, tree) is the
writer's (:mod:`signerd.audit._writer`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from signerd.audit._fs import _why
from signerd.audit._line import HEAD_SIZE, _head_record
from signerd.errors import Unavailable

# One logger for the whole package, named after its public module.
log = logging.getLogger("signerd.audit")


class _LogFiles:
    """The current file and the head file of the log at ``path``; not
    thread-safe (the writer calls it with its lock held).

    ``fd`` and ``head_fd`` are None until opened and after :meth:`close`;
    ``ident`` is the current file's (device, inode); ``size`` its bytes;
    ``broken`` says why no line may be appended any more (None: it may).
    """

    def __init__(self, path: Path, head_path: Path, fsync: bool) -> None:
        self.path = path
        self.head_path = head_path
        self.fsync = fsync
        self.fd: int | None = None
        self.ident = (0, 0)
        self.head_fd: int | None = None
        self.size = 0  # bytes in the current file
        self.broken: str | None = None
        self._head_warned = False

    def unwritable(self) -> str | None:
        """Why no line may be appended for good (the files are closed, or
        the log is broken), or None."""
        if self.fd is None:
            return "audit log cannot be written: it is closed"
        if self.broken is not None:
            return f"audit log cannot be written: {self.broken}"
        return None

    def append(self, data: bytes) -> None:
        """Write ``data`` at the end of the current file (and fsync with
        ``fsync``). Raises :class:`Unavailable`; the bytes written are then
        cut off again, or, if they cannot be, ``broken`` is set."""
        assert self.fd is not None
        written = 0
        try:
            # One write() normally; loop because a short write is allowed.
            while written < len(data):
                written += os.write(self.fd, data[written:])
            if self.fsync:
                os.fsync(self.fd)
        except OSError as e:
            self._undo(written)
            raise Unavailable(f"audit log cannot be written: {self.path}: {_why(e)}") from None

    def _undo(self, written: int) -> None:
        """Cut a partly written (or unsynced) line off the end again."""
        if not written:
            return
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, os.fstat(self.fd).st_size - written)
        except OSError as e:
            # The file now ends in bytes the chain does not account for.
            self.broken = (f"{self.path} ends in a partly written line that could not be "
                           f"removed ({_why(e)}); restart after 'signerctl audit verify'")
            log.error("audit log is broken; refusing further writes",
                      extra={"fields": {"file": str(self.path), "error": _why(e)}})

    def write_head(self, seq: int, last: str) -> None:
        """Name line ``seq`` (hashing to ``last``) in the head file; a
        failure is logged (once until a write succeeds), not raised."""
        if self.head_fd is None:
            return
        try:
            os.pwrite(self.head_fd, _head_record(seq, last), 0)
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

    def trim_head(self) -> None:
        """Drop anything past the head file's fixed-size record."""
        assert self.head_fd is not None
        try:
            os.ftruncate(self.head_fd, HEAD_SIZE)
        except OSError:
            pass  # a longer head still parses: only trailing padding follows the record

    def sync_leaving(self) -> None:
        """Sync the current file as it is rotated away (unless every write
        is synced anyway); a failure is logged, not raised."""
        if self.fd is None or self.fsync:
            return
        try:
            os.fsync(self.fd)
        except OSError as e:
            log.warning("audit log file cannot be synced as it is rotated away",
                        extra={"fields": {"file": str(self.path), "error": _why(e)}})

    def close(self) -> None:
        """Close both files (which also releases the flock); idempotent."""
        for fd in (self.fd, self.head_fd):
            if fd is not None:
                try:
                    os.close(fd)  # also releases the flock
                except OSError:
                    pass
        self.fd = self.head_fd = None
