"""Verification: :func:`verify` and :func:`verify_files` read log files, one
or several rotated ones as one chain, and name the first fault; :class:`_Chain`
carries the state from line to line and file to file; :func:`format_result`
says it in one line."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, cast

from signerd.audit._fs import _why
from signerd.audit._line import (
    MAX_LINE_BYTES,
    ZERO_HASH,
    _is_hash,
    _parse,
    _read_head,
    head_path,
)

Problem = Literal["edited", "deleted", "reordered", "truncated", "missing", "head", "anchor",
                  "unreadable"]


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
