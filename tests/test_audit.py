"""Tests for signerd.audit: the chain, resuming, failing closed, and verify."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import (
    HEAD_SIZE,
    ZERO_HASH,
    AuditLog,
    VerifyResult,
    format_result,
    head_path,
    verify,
)
from signerd.errors import ConfigError, Unavailable
from tests._fullfs import small_fs

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(i: int) -> dict[str, Any]:
    return {
        "request_id": f"req-{i}", "identity": f"spiffe://ci/runner-{i}", "peer": "ipv4:10.0.0.1:5",
        "transport": "tcp", "operation": "sign", "key_id": "ab" * 32, "gun": "docker.io/acme/app",
        "role": "targets", "token": "online", "payload_sha256": "cd" * 32, "decision": "allow",
        "status": "OK", "latency_ms": 1.5,
    }


def make_log(path: Path, n: int) -> Path:
    with AuditLog(path) as log:
        for i in range(1, n + 1):
            log.write(record(i))
    return path


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


# -- writing


def test_write_produces_a_valid_chain(log_path: Path) -> None:
    make_log(log_path, 5)
    lines = lines_of(log_path)
    prev = ZERO_HASH
    for seq, line in enumerate(lines, start=1):
        doc = json.loads(line)
        assert doc == {**record(seq), "seq": seq, "prev": prev, "time": doc["time"]}
        assert TIME_RE.match(doc["time"])
        # Compact, sorted keys: the bytes are reproducible from the object.
        assert line == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        prev = sha(line)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    head = head_path(log_path).read_bytes()
    assert len(head) == HEAD_SIZE and json.loads(head) == {"seq": 5, "sha256": prev}
    assert verify(log_path) == VerifyResult(
        True, 5, None, "chain intact; end matches the head file (seq 5)", None, str(log_path))


def test_resume_after_reopen_continues_the_chain(log_path: Path) -> None:
    make_log(log_path, 3)
    last = sha(lines_of(log_path)[-1])
    with AuditLog(log_path) as log:
        assert (log.seq, log.last_hash) == (3, last)
        log.write(record(4))
        log.write(record(5))
    docs = [json.loads(line) for line in lines_of(log_path)]
    assert [d["seq"] for d in docs] == [1, 2, 3, 4, 5]
    assert docs[3]["prev"] == last
    assert verify(log_path).ok


def test_resume_reads_only_the_tail(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_log(log_path, 30_000)  # several megabytes
    assert log_path.stat().st_size > 8 * 1024 * 1024
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr("signerd.audit._rotation.os.pread", counting_pread)
    with AuditLog(log_path) as log:
        assert log.seq == 30_000
    assert sum(read) <= 64 * 1024


@pytest.mark.parametrize(("tail", "why"), [
    pytest.param(b'{"seq":4,"prev":"00', "has no newline (a torn write?)", id="torn-partial-line"),
    pytest.param(b"garbage\n", "is not an audit record (not JSON)", id="garbage-line"),
    pytest.param(b'{"prev":"' + b"0" * 64 + b'"}\n', "is not an audit record (no valid 'seq')",
                 id="line-without-seq"),
])
def test_refuses_to_start_on_a_bad_last_line(log_path: Path, tail: bytes, why: str) -> None:
    make_log(log_path, 3)
    offset = log_path.stat().st_size
    with log_path.open("ab") as f:
        f.write(tail)
    with pytest.raises(ConfigError) as info:
        AuditLog(log_path)
    assert str(info.value).startswith(
        f"audit log {log_path}: the last line (byte {offset}, after seq 3) {why}; "
        f"refusing to continue the chain: run 'signerctl audit verify {log_path}'")


@pytest.mark.parametrize(("mutate", "message"), [
    pytest.param(lambda p: p.write_bytes(b"".join(x + b"\n" for x in lines_of(p)[:3])),
                 "ends at seq 3 but its head file records seq 5", id="tail-lines-removed"),
    pytest.param(lambda p: p.write_bytes(b""), "ends at seq 0 but its head file records seq 5",
                 id="emptied"),
    pytest.param(lambda p: p.unlink(), "ends at seq 0 but its head file records seq 5",
                 id="log-removed-head-kept"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes().replace(b"runner-5", b"mallory")),
                 "last line does not match its head file", id="last-line-edited"),
    pytest.param(lambda p: head_path(p).write_text("{}"), "head file audit.log.head is malformed",
                 id="head-malformed"),
])
def test_refuses_to_start_when_head_shows_tampering(
        log_path: Path, mutate: Callable[[Path], Any], message: str) -> None:
    make_log(log_path, 5)
    mutate(log_path)
    with pytest.raises(ConfigError, match=f"^audit log {re.escape(str(log_path))}: "
                                          f"{re.escape(message)}"):
        AuditLog(log_path)


def test_missing_head_is_recreated_with_a_warning(
        log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_log(log_path, 2)
    head_path(log_path).unlink()
    assert "no head file" in verify(log_path).reason
    with caplog.at_level(logging.WARNING, logger="signerd.audit"), AuditLog(log_path):
        pass
    assert any("head file is missing" in r.getMessage() for r in caplog.records)
    assert verify(log_path).reason == "chain intact; end matches the head file (seq 2)"


def test_second_writer_is_refused(log_path: Path) -> None:
    with AuditLog(log_path):
        with pytest.raises(ConfigError, match="another process is writing it"):
            AuditLog(log_path)


def test_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot open: Not a directory"):
        AuditLog(tmp_path / "file" / "audit.log")


def test_disk_full_raises_unavailable_and_does_not_advance(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        path = fs.path / "full.log"
        log = AuditLog(path)
        try:
            fs.fill()  # a real full file system: every write fails with ENOSPC
            with pytest.raises(Unavailable, match="^audit log cannot be written: .*No space left"):
                log.write(record(1))
            assert (log.seq, log.last_hash) == (0, ZERO_HASH)
            assert path.read_bytes() == b""  # no partial line left behind
            fs.free()
            log.write(record(1))
            assert log.seq == 1
        finally:
            log.close()
        assert json.loads(head_path(path).read_bytes())["seq"] == 1
        assert verify(path).ok


def test_directory_replaced_by_file_raises_unavailable_then_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "audit.log"
    with AuditLog(path) as log:
        log.write(record(1))
        directory.rename(tmp_path / "moved")
        directory.write_text("not a directory")  # root ignores modes; a file parent stops it
        with pytest.raises(Unavailable, match="was removed or replaced and cannot be recreated"):
            log.write(record(2))
        assert log.seq == 1
        directory.unlink()
        (tmp_path / "moved").rename(directory)
        log.write(record(2))
        assert log.seq == 2
    assert verify(path).ok and verify(path).lines == 2


def test_partial_write_is_cut_off_and_chain_not_advanced(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_log(log_path, 2)
    before = log_path.read_bytes()
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with AuditLog(log_path) as log:
        monkeypatch.setattr("signerd.audit._files.os.write", half_then_enospc)
        with pytest.raises(Unavailable, match="No space left on device"):
            log.write(record(3))
        assert log_path.read_bytes() == before and log.seq == 2
        monkeypatch.setattr("signerd.audit._files.os.write", real_write)
        log.write(record(3))
    assert verify(log_path).ok and verify(log_path).lines == 3


def test_partial_write_that_cannot_be_undone_stops_all_writes(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def half_then_eio(fd: int, data: bytes) -> int:
        if not getattr(half_then_eio, "done", False):
            half_then_eio.done = True  # type: ignore[attr-defined]
            return real_write(fd, data[:10])
        raise OSError(errno.EIO, "Input/output error")

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with AuditLog(log_path) as log:
        monkeypatch.setattr("signerd.audit._files.os.write", half_then_eio)
        monkeypatch.setattr("signerd.audit._files.os.ftruncate", no_truncate)
        with pytest.raises(Unavailable, match="Input/output error"):
            log.write(record(1))
        monkeypatch.setattr("signerd.audit._files.os.write", real_write)
        with pytest.raises(Unavailable, match="ends in a partly written line"):
            log.write(record(1))
        assert log.seq == 0


def test_rotation_continues_the_chain_in_a_new_file(
        log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rotated = log_path.with_name("audit.log.1")
    with caplog.at_level(logging.WARNING, logger="signerd.audit"), AuditLog(log_path) as log:
        log.write(record(1))
        log.write(record(2))
        log_path.rename(rotated)
        log.write(record(3))
    assert any("removed or replaced" in r.getMessage() for r in caplog.records)
    # The new file starts with a rotation record (seq 3) that links to the old file's end;
    # the other program's name for the old file is unknown.
    first = json.loads(lines_of(log_path)[0])
    assert (first["seq"], first["operation"], first["reason"], first["previous_file"]) == (
        3, "audit.rotate", "renamed", None)
    assert first["prev"] == sha(lines_of(rotated)[-1])
    alone = verify(log_path)
    assert alone.ok and "continuing a file renamed by another program" in alone.reason
    joined = log_path.with_name("joined.log")
    joined.write_bytes(rotated.read_bytes() + log_path.read_bytes())
    assert verify(joined, head=head_path(log_path)).ok


def test_concurrent_writers_give_a_valid_chain(log_path: Path) -> None:
    log = AuditLog(log_path)
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        for i in range(200):
            log.write({**record(i), "request_id": f"{t}-{i}"})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    result = verify(log_path)
    assert (result.ok, result.lines) == (True, 1600), result.reason
    ids = [json.loads(line)["request_id"] for line in lines_of(log_path)]
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(8) for i in range(200))


def test_write_rejects_reserved_keys_and_closed_log(log_path: Path) -> None:
    log = AuditLog(log_path)
    with pytest.raises(ValueError, match=r"must not set \['prev', 'seq'\]"):
        log.write({"seq": 9, "prev": ZERO_HASH})
    log.close()
    log.close()  # idempotent
    with pytest.raises(Unavailable, match="it is closed"):
        log.write(record(1))
    assert verify(log_path).lines == 0


def test_client_controlled_values_stay_on_one_bounded_line(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        log.write({"gun": "x" * 100_000, "identity": "evil\n{\"seq\":1}\u2028é"})
    (line,) = lines_of(log_path)
    doc = json.loads(line)
    assert len(line) < 2000 and line.isascii()
    assert doc["identity"] == "evil\n{\"seq\":1}\u2028é"
    assert doc["gun"].startswith("x" * 256 + "...[100000 chars, sha256 ")
    assert verify(log_path).ok


def test_fsync_option_and_checkpoints(log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="signerd.audit"):
        with AuditLog(log_path, fsync=True, checkpoint_every=2) as log:
            for i in range(5):
                log.write(record(i))
    seqs = [(r.getMessage(), r.fields["seq"]) for r in caplog.records]  # type: ignore[attr-defined]
    assert seqs == [("audit log opened", 0), ("audit checkpoint", 2), ("audit checkpoint", 4),
                    ("audit log closed", 5)]
    assert verify(log_path, expect_last=caplog.records[-1].fields["sha256"]).ok  # type: ignore[attr-defined]


# -- verify: tampering


def rewrite(edit: Callable[[list[bytes]], list[bytes]]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(b"".join(line + b"\n" for line in edit(lines_of(path))))
    return apply


def edit_line(n: int, old: bytes, new: bytes) -> Callable[[Path], None]:
    def edit(lines: list[bytes]) -> list[bytes]:
        assert old in lines[n - 1]
        lines[n - 1] = lines[n - 1].replace(old, new)
        return lines
    return rewrite(edit)


def move(src: int, dst: int) -> Callable[[Path], None]:
    def edit(lines: list[bytes]) -> list[bytes]:
        lines.insert(dst - 1, lines.pop(src - 1))
        return lines
    return rewrite(edit)


def cut_bytes(n: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:-n])
    return apply


def no_head(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        head_path(path).unlink()
        mutate(path)
    return apply


TAMPERING = [
    # (mutation of a 10-line log, problem, first bad line, reason starts with)
    pytest.param(edit_line(4, b"runner-4", b"mallory"), "edited", 4,
                 "line edited (hash does not match line 5's prev)", id="edit-middle-line"),
    pytest.param(edit_line(1, b"runner-1", b"mallory"), "edited", 1,
                 "line edited (hash does not match line 2's prev)", id="edit-first-line"),
    pytest.param(edit_line(10, b'"allow"', b'"deny"'), "edited", 10,
                 "line edited (its hash does not match the head file's, seq 10)",
                 id="edit-last-line-caught-by-head"),
    pytest.param(edit_line(4, b'"seq":4', b'"seq":40'), "edited", 4,
                 "line edited (seq is 40, expected 4)", id="edit-seq-field"),
    pytest.param(edit_line(6, b"{", b"["), "edited", 6,
                 "line edited (not an audit record: not JSON)", id="edit-to-non-json"),
    pytest.param(edit_line(1, b'"prev":"0', b'"prev":"1'), "edited", 1,
                 "line edited (the first line's prev is not 64 zeros)", id="edit-first-prev"),
    pytest.param(rewrite(lambda ls: ls[:3] + ls[4:]), "deleted", 4,
                 "line(s) removed before this line (seq jumps from 3 to 5)", id="delete-line-4"),
    pytest.param(rewrite(lambda ls: ls[:3] + ls[6:]), "deleted", 4,
                 "line(s) removed before this line (seq jumps from 3 to 7)", id="delete-lines-4-6"),
    pytest.param(rewrite(lambda ls: ls[1:]), "deleted", 1,
                 "the file starts at seq 2: the first 1 line(s) were removed", id="delete-first"),
    pytest.param(rewrite(lambda ls: ls[:4] + [b""] + ls[4:]), "edited", 5,
                 "line edited (not an audit record: not JSON)", id="insert-empty-line"),
    pytest.param(move(5, 4), "reordered", 4,
                 "lines reordered (seq 5 here, but seq 4 appears later, at line 5)",
                 id="swap-4-and-5"),
    pytest.param(move(8, 3), "reordered", 3,
                 "lines reordered (seq 8 here, but seq 3 appears later, at line 4)",
                 id="move-8-to-3"),
    pytest.param(move(2, 7), "reordered", 2,
                 "lines reordered (seq 3 here, but seq 2 appears later, at line 7)",
                 id="move-2-to-7"),
    pytest.param(rewrite(lambda ls: ls[:5] + [ls[3]] + ls[5:]), "reordered", 6,
                 "lines reordered or duplicated (seq 4 after seq 5)", id="duplicate-line-4"),
    pytest.param(cut_bytes(30), "truncated", 10,
                 "line incomplete (no newline at the end of the file): truncated write",
                 id="partial-last-line"),
    pytest.param(cut_bytes(1), "truncated", 10,
                 "line incomplete (no newline at the end of the file)", id="last-newline-cut"),
    pytest.param(rewrite(lambda ls: ls[:7]), "truncated", 8,
                 "lines missing at the end: truncated (the file ends at seq 7; the head file "
                 "records seq 10)", id="last-3-lines-removed-head"),
    pytest.param(lambda p: p.write_bytes(b""), "truncated", 1,
                 "lines missing at the end: truncated (the file ends at seq 0", id="emptied-head"),
    pytest.param(lambda p: head_path(p).write_text('{"seq":"10"}'), "head", None,
                 "head file audit.log.head is malformed", id="head-tampered"),
    pytest.param(lambda p: p.unlink(), "unreadable", None,
                 "cannot read: No such file or directory", id="log-missing"),
]


@pytest.mark.parametrize(("mutate", "problem", "line", "reason"), TAMPERING)
def test_verify_names_the_first_bad_line(log_path: Path, mutate: Callable[[Path], None],
                                         problem: str, line: int | None, reason: str) -> None:
    make_log(log_path, 10)
    mutate(log_path)
    result = verify(log_path)
    assert (result.ok, result.problem, result.first_bad_line) == (False, problem, line), result
    assert result.reason.startswith(reason), result.reason


@pytest.mark.parametrize(("mutate", "lines"), [
    pytest.param(no_head(rewrite(lambda ls: ls[:7])), 7, id="tail-lines-removed"),
    pytest.param(no_head(edit_line(10, b'"allow"', b'"deny"')), 10, id="last-line-edited"),
])
def test_without_head_file_tail_changes_are_undetectable(
        log_path: Path, mutate: Callable[[Path], None], lines: int) -> None:
    # Documented limitation: the chain alone cannot see the end of the file.
    make_log(log_path, 10)
    mutate(log_path)
    result = verify(log_path)
    assert (result.ok, result.lines) == (True, lines)
    assert "no head file, so lines removed from the end cannot be detected" in result.reason


def test_head_that_lags_is_accepted(log_path: Path) -> None:
    make_log(log_path, 4)
    stale = head_path(log_path).read_bytes()
    make_log(log_path, 2)  # lines 5 and 6
    head_path(log_path).write_bytes(stale)  # as if the process died between the two writes
    result = verify(log_path)
    assert (result.ok, result.lines) == (True, 6)
    assert "head file lags at seq 4" in result.reason


@pytest.mark.parametrize(("anchor", "ok", "problem", "bad"), [
    pytest.param(lambda ls: sha(ls[4]), True, None, None, id="ends-with-anchor"),
    pytest.param(lambda ls: sha(ls[4]).upper(), True, None, None, id="upper-case-anchor"),
    pytest.param(lambda ls: sha(ls[2]), False, "anchor", 4, id="lines-after-anchor"),
    pytest.param(lambda ls: "ee" * 32, False, "anchor", None, id="anchor-not-in-file"),
    pytest.param(lambda ls: "not-a-hash", False, "anchor", None, id="anchor-not-a-hash"),
])
def test_verify_expect_last(log_path: Path, anchor: Callable[[list[bytes]], str], ok: bool,
                            problem: str | None, bad: int | None) -> None:
    make_log(log_path, 5)
    result = verify(log_path, expect_last=anchor(lines_of(log_path)))
    assert (result.ok, result.problem, result.first_bad_line) == (ok, problem, bad), result


@pytest.mark.parametrize(("result", "text"), [
    pytest.param(VerifyResult(True, 5, None, "chain intact; end matches the head file (seq 5)",
                              None, "audit.log"),
                 "audit.log: OK: 5 lines, chain intact; end matches the head file (seq 5)",
                 id="ok"),
    pytest.param(VerifyResult(False, 20, 17, "line edited (hash does not match line 18's prev)",
                              "edited", "audit.log"),
                 "audit.log: chain broken at line 17: line edited "
                 "(hash does not match line 18's prev)", id="broken-at-line"),
    pytest.param(VerifyResult(False, 0, None, "cannot read: No such file or directory",
                              "unreadable", "audit.log"),
                 "audit.log: verification failed: cannot read: No such file or directory",
                 id="no-line"),
])
def test_format_result(result: VerifyResult, text: str) -> None:
    assert format_result(result) == text


def test_format_result_of_a_real_edit(log_path: Path) -> None:
    make_log(log_path, 20)
    edit_line(17, b"runner-17", b"mallory")(log_path)
    assert format_result(verify(log_path)) == (
        f"{log_path}: chain broken at line 17: line edited (hash does not match line 18's prev)")


@pytest.mark.parametrize(("bad", "message"), [
    pytest.param({"latency_ms": float("nan")}, "cannot be serialised", id="nan"),
    pytest.param({"nested": {1: "x", "a": "y"}}, "cannot be serialised", id="mixed-key-types"),
    pytest.param({"blob": ["x" * 1000] * 1100}, "limit 1048576", id="over-line-limit"),
])
def test_unwritable_record_is_a_caller_bug_and_does_not_advance(
        log_path: Path, bad: dict[str, Any], message: str) -> None:
    with AuditLog(log_path) as log:
        with pytest.raises(ValueError, match=message):
            log.write(bad)
        assert log.seq == 0
    assert log_path.read_bytes() == b""


def test_head_write_failure_warns_once_and_keeps_logging(
        log_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def eio(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with caplog.at_level(logging.WARNING, logger="signerd.audit"):
        log = AuditLog(log_path)
        log.write(record(1))
        monkeypatch.setattr("signerd.audit._files.os.pwrite", eio)
        log.write(record(2))
        log.write(record(3))
        monkeypatch.undo()
        log.close()
    warnings = [r for r in caplog.records if "head file cannot be updated" in r.getMessage()]
    assert len(warnings) == 1
    assert verify(log_path).ok and verify(log_path).lines == 3


def test_a_group_is_consecutive_lines_of_the_chain(log_path: Path) -> None:
    """write_many (a SignStream chunk) appends one line per record, chained as
    single writes would be, with a checkpoint when the group passes one."""
    with AuditLog(log_path, checkpoint_every=4) as log:
        log.write(record(1))
        log.write_many([record(i) for i in range(2, 7)])
        log.write_many([])
        assert log.seq == 6
        log.write(record(7))
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, 8))
    assert [x["request_id"] for x in lines] == [record(i)["request_id"] for i in range(1, 8)]
    assert verify(log_path).reason == "chain intact; end matches the head file (seq 7)"


def test_a_group_that_cannot_be_written_leaves_no_line(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        path = fs.path / "full.log"
        log = AuditLog(path)
        try:
            fs.fill()
            with pytest.raises(Unavailable, match="No space left"):
                log.write_many([record(1), record(2), record(3)])
            assert (log.seq, log.last_hash) == (0, ZERO_HASH)
            assert path.read_bytes() == b""
        finally:
            log.close()


def test_a_group_with_a_bad_record_writes_nothing(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        with pytest.raises(ValueError, match="must not set"):
            log.write_many([record(1), {**record(2), "seq": 5}])
        assert log.seq == 0
    assert log_path.read_text() == ""
