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
new file at the path and continues the chain in it (``seq`` and ``prev``
carry on), so the rotated files verify when concatenated in order; if the
new file cannot be created, that write raises ``Unavailable``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal

from signerd.errors import ConfigError, Unavailable

log = logging.getLogger("signerd.audit")

ZERO_HASH: Final = "0" * 64
HEAD_SIZE: Final = 128
MAX_LINE_BYTES: Final = 1 << 20  # verify and the tail reader give up on longer lines
MAX_VALUE_CHARS: Final = 1024
_TAIL_WINDOW: Final = 64 * 1024
_RESERVED: Final = frozenset({"time", "seq", "prev"})
_HEX: Final = frozenset("0123456789abcdef")
# Compact, sorted keys, ASCII only (no raw newline or odd byte can reach the file);
# NaN is not JSON, and anything else unusual is written as its str().
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                   allow_nan=False, default=str)

Problem = Literal["edited", "deleted", "reordered", "truncated", "head", "anchor", "unreadable"]


def head_path(path: Path) -> Path:
    """Where the head file of the log ``path`` lives: ``<path>.head``."""
    return path.with_name(path.name + ".head")


class AuditLog:
    """Appends hash-chained JSON lines to ``path``; thread-safe.

    Raises :class:`ConfigError` at startup when the file cannot be opened, is
    locked by another process, ends in a line that is not a complete record
    (a torn write), or is shorter than its head file says.
    """

    def __init__(self, path: Path, *, fsync: bool = False, checkpoint_every: int = 1000) -> None:
        self.path = path
        self.head_path = head_path(path)
        self._fsync = fsync
        self._checkpoint_every = max(1, checkpoint_every)
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._head_warned = False
        self._fd: int | None = None
        self._head_fd: int | None = None
        try:
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
        self._checkpoint("audit log opened")

    @property
    def seq(self) -> int:
        """Sequence number of the last line written (0 for an empty log)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """SHA-256 of the last line written (:data:`ZERO_HASH` for an empty log)."""
        return self._last

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record, adding ``time``, ``seq`` and ``prev``.

        Raises :class:`Unavailable` if the line cannot be written; the chain
        then stays where it was. ``ValueError`` means a caller bug: a
        reserved key, or a value JSON cannot hold.
        """
        reserved = _RESERVED.intersection(record)
        if reserved:
            raise ValueError(f"audit record must not set {sorted(reserved)}; the log adds them")
        doc = dict(record)
        for k, v in doc.items():
            if isinstance(v, str) and len(v) > MAX_VALUE_CHARS:
                doc[k] = _shorten(v)
        with self._lock:
            if self._fd is None:
                raise Unavailable("audit log cannot be written: it is closed")
            if self._broken is not None:
                raise Unavailable(f"audit log cannot be written: {self._broken}")
            self._follow_path()
            seq = self._seq + 1
            doc.update(time=_now(), seq=seq, prev=self._last)
            try:
                line = _ENCODER.encode(doc).encode("ascii")
            except (TypeError, ValueError) as e:
                raise ValueError(f"audit record cannot be serialised: {e}") from None
            if len(line) >= MAX_LINE_BYTES:
                raise ValueError(f"audit record is {len(line)} bytes; limit {MAX_LINE_BYTES}")
            self._append(line + b"\n")
            self._seq, self._last = seq, hashlib.sha256(line).hexdigest()
            self._write_head()
            if seq % self._checkpoint_every == 0:
                self._checkpoint("audit checkpoint")

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

    def _resume(self) -> tuple[int, str]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        seq, last = 0, ZERO_HASH
        if size:
            seq, last = _resume_point(self._fd, size, self.path)
        head = _read_head(self.head_path)
        if isinstance(head, str):
            raise ConfigError(f"audit log {self.path}: {head}; run 'signerctl audit verify "
                              f"{self.path}' and repair or move both files before starting")
        if head is None:
            if seq:
                log.warning("audit head file is missing; recreating it (removal of lines at the "
                            "end of the log before now cannot be detected)",
                            extra={"fields": {"file": str(self.head_path), "seq": seq}})
            return seq, last
        head_seq, head_hash = head
        if head_seq > seq or (head_seq == seq and head_hash != last):
            what = (f"ends at seq {seq} but its head file records seq {head_seq}"
                    if head_seq > seq else "last line does not match its head file")
            raise ConfigError(f"audit log {self.path}: {what}: lines were removed or edited; run "
                              f"'signerctl audit verify {self.path}' before starting (to start a "
                              f"new chain, move both {self.path.name} and "
                              f"{self.head_path.name} away)")
        return seq, last

    def _follow_path(self) -> None:
        """Reopen the path if the file was removed or replaced (rotation)."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                return
        except OSError:
            pass
        try:
            fd, ident = _open_locked(self.path)
        except (OSError, _Locked) as e:
            raise Unavailable(f"audit log cannot be written: {self.path} was removed or "
                              f"replaced and cannot be recreated: {_why(e)}") from None
        try:
            head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            os.close(fd)
            raise Unavailable(f"audit log cannot be written: cannot open "
                              f"{self.head_path}: {_why(e)}") from None
        self._close_fds()
        self._fd, self._ident, self._head_fd = fd, ident, head_fd
        log.warning("audit log file was removed or replaced; continuing the chain in a new file",
                    extra={"fields": {"file": str(self.path), "seq": self._seq + 1}})

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


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _now() -> str:
    # isoformat() is several times faster than strftime() on this hot path.
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


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


def _parse(line: bytes) -> tuple[int, str] | str:
    """(seq, prev) of a record line, or why it is not one."""
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
    return seq, prev


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
    """Outcome of :func:`verify`. Lines are numbered from 1.

    ``lines`` counts the complete lines in the file; ``first_bad_line`` is the
    first line edited, removed (the position where lines are missing),
    reordered or truncated, or None when the fault has no line.
    """

    ok: bool
    lines: int
    first_bad_line: int | None
    reason: str
    problem: Problem | None = None
    path: str = ""


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


def verify(path: Path, expect_last: str | None = None, *, head: Path | None = None) -> VerifyResult:
    """Check the chain of the log at ``path`` and name the first bad line.

    The head file (``head``, default ``<path>.head``) is used when present to
    detect lines removed from the end. ``expect_last`` is the hex SHA-256 of
    the line the file must end with (an anchor kept elsewhere).
    """
    if expect_last is not None:
        expect_last = expect_last.strip().lower()
        if not _is_hash(expect_last):
            return VerifyResult(False, 0, None, "the expected last line hash must be 64 hex "
                                "digits (a SHA-256)", "anchor", str(path))
    # Head first, log second: the writer updates the head after the line, so
    # a live log always holds at least what this head names.
    anchor = _read_head(head if head is not None else head_path(path))
    if isinstance(anchor, str):
        return VerifyResult(False, 0, None, anchor, "head", str(path))
    try:
        f = open(path, "rb")
    except OSError as e:
        return VerifyResult(False, 0, None, f"cannot read: {_why(e)}", "unreadable", str(path))
    with f:
        return _check(f, anchor, expect_last, str(path))


class _Fail(Exception):
    def __init__(self, line: int, reason: str, problem: Problem,
                 missing: range | None = None) -> None:
        super().__init__(reason)
        self.line, self.reason, self.problem, self.missing = line, reason, problem, missing


def _check(f: IO[bytes], anchor: tuple[int, str] | None, expect_last: str | None,
           name: str) -> VerifyResult:
    n = 0
    prev_hash, prev_seq = ZERO_HASH, 0
    anchor_line: int | None = None
    anchor_ok = True
    expect_line: int | None = None
    fail: _Fail | None = None
    for raw in _lines(f):
        if raw is not None and not raw.endswith(b"\n"):
            # The end of the file, in the middle of a line.
            if fail is None:
                fail = _Fail(n + 1, "line incomplete (no newline at the end of the file): "
                             "truncated write", "truncated")
            break
        n += 1
        if fail is not None:
            # Keep counting; for a seq gap, look for the missing seqs further on.
            later = _parse(raw[:-1]) if raw is not None and fail.missing is not None else None
            if isinstance(later, tuple) and fail.missing is not None and later[0] in fail.missing:
                fail = _Fail(fail.line, f"lines reordered (seq {fail.missing.stop} here, but "
                             f"seq {later[0]} appears later, at line {n})", "reordered")
            continue
        if raw is None:
            fail = _Fail(n, f"line edited (longer than {MAX_LINE_BYTES} bytes)", "edited")
            continue
        line = raw[:-1]
        parsed = _parse(line)
        if isinstance(parsed, str):
            fail = _Fail(n, f"line edited (not an audit record: {parsed})", "edited")
            continue
        seq, prev = parsed
        linked, in_order = prev == prev_hash, seq == prev_seq + 1
        if not (linked and in_order):
            fail = _classify(n, seq, prev_seq, linked, in_order)
            continue
        prev_hash, prev_seq = hashlib.sha256(line).hexdigest(), seq
        if anchor is not None and seq == anchor[0]:
            anchor_line, anchor_ok = n, prev_hash == anchor[1]
        if expect_last is not None and prev_hash == expect_last:
            expect_line = n

    def bad(line: int | None, reason: str, problem: Problem) -> VerifyResult:
        return VerifyResult(False, n, line, reason, problem, name)

    if fail is not None:
        return bad(fail.line, fail.reason, fail.problem)
    if anchor is not None:
        head_seq = anchor[0]
        if anchor_line is not None and not anchor_ok:
            return bad(anchor_line, "line edited (its hash does not match the head file's, "
                       f"seq {head_seq})", "edited")
        if head_seq > prev_seq:
            return bad(n + 1, f"lines missing at the end: truncated (the file ends at seq "
                       f"{prev_seq}; the head file records seq {head_seq})", "truncated")
    if expect_last is not None and expect_last != prev_hash:
        if expect_line is not None:
            return bad(expect_line + 1, f"lines were added after the expected last line "
                       f"(line {expect_line})", "anchor")
        return bad(None, "the expected last line is not in the file: truncated or rewritten",
                   "anchor")
    if anchor is None:
        note = "no head file, so lines removed from the end cannot be detected"
    elif anchor[0] < prev_seq:
        note = f"head file lags at seq {anchor[0]} (accepted)"
    else:
        note = f"end matches the head file (seq {anchor[0]})"
    if expect_last is not None:
        note += "; ends with the expected line"
    return VerifyResult(True, n, None, f"chain intact; {note}", None, name)


def _classify(n: int, seq: int, prev_seq: int, linked: bool, in_order: bool) -> _Fail:
    """Name what happened at line ``n``, the first line whose links do not hold."""
    expected = prev_seq + 1
    if linked:
        # Its prev still hashes the line before, so nothing between was
        # removed: this line's own seq was changed.
        return _Fail(n, f"line edited (seq is {seq}, expected {expected})", "edited")
    if in_order:
        if n == 1:
            return _Fail(1, "line edited (the first line's prev is not 64 zeros)", "edited")
        # Right seq, wrong prev: the line before changed after this one was written.
        return _Fail(n - 1, f"line edited (hash does not match line {n}'s prev)", "edited")
    if seq > expected:
        missing = range(expected, seq)
        what = (f"the file starts at seq {seq}: the first {seq - 1} line(s) were removed, or it "
                "continues a rotated log (verify the files concatenated in order)" if n == 1
                else f"line(s) removed before this line (seq jumps from {prev_seq} to {seq})")
        # Becomes "reordered" if a missing seq turns up later in the file.
        return _Fail(n, what, "deleted", missing)
    return _Fail(n, f"lines reordered or duplicated (seq {seq} after seq {prev_seq})",
                 "reordered")


def format_result(result: VerifyResult) -> str:
    """One line for people, e.g. ``audit.log: chain broken at line 17: line edited (...)``."""
    if result.ok:
        return f"{result.path}: OK: {result.lines} lines, {result.reason}"
    if result.first_bad_line is not None:
        return f"{result.path}: chain broken at line {result.first_bad_line}: {result.reason}"
    return f"{result.path}: verification failed: {result.reason}"
