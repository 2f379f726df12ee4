"""Audit log rotation that keeps the chain (signerd/audit/, Rotation).

The first half drives AuditLog directly: names, the rotation record, size
rotation, crash recovery, and verify_files naming a missing, reordered,
truncated or edited file. The second half rotates a real daemon's log under
concurrent signing, by size and by SIGUSR1, with one process and with two
workers, and checks the whole sequence with ``signerctl audit verify``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from signerd.audit import (
    ROTATE_OPERATION,
    AuditLog,
    head_path,
    verify,
    verify_files,
)
from signerd.client import Client, ClientConfig
from signerd.config import parse_config
from signerd.errors import ConfigError, Unavailable
from tests._fullfs import small_fs
from tests.conftest import ADMIN, HSM, PKI, daemon_config, spawn_daemon, unique_gun, write_toml

ROTATED = re.compile(r"^audit\.log\.(\d{8}T\d{6})Z$")


def record(i: int) -> dict[str, Any]:
    return {"request_id": f"req-{i}", "identity": "spiffe://ci/runner", "operation": "sign",
            "status": "OK", "payload_sha256": "cd" * 32}


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the log ``path``, oldest first (as a shell glob sorts them)."""
    return sorted(path.parent.glob(path.name + ".2*"))


def chain_of(path: Path) -> list[Path]:
    return [*rotated_files(path), path]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def three_files(log_path: Path, per_file: int = 4) -> list[Path]:
    """A log rotated twice: [first, second, live], ``per_file`` request lines each."""
    n = 0
    with AuditLog(log_path) as log:
        for _ in range(2):
            for _ in range(per_file):
                n += 1
                log.write(record(n))
            assert log.rotate() is not None
        for _ in range(per_file):
            n += 1
            log.write(record(n))
    files = chain_of(log_path)
    assert len(files) == 3
    return files


# -- rotating


def test_rotate_renames_and_links_the_new_file_to_the_old(
        log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="signerd.audit"), AuditLog(log_path) as log:
        log.write(record(1))
        log.write(record(2))
        before = time.time()
        target = log.rotate()
        assert target is not None and target.parent == log_path.parent
        m = ROTATED.match(target.name)
        assert m is not None, target.name
        assert abs(time.mktime(time.strptime(m.group(1) + "UTC", "%Y%m%dT%H%M%S%Z"))
                   - time.mktime(time.gmtime(before))) <= 2
        log.write(record(3))
        assert log.seq == 4  # two lines, the rotation record, one line
    old, new = lines_of(target), lines_of(log_path)
    assert len(old) == 2 and len(new) == 2
    first = json.loads(new[0])
    assert {k: first[k] for k in ("operation", "reason", "previous_file", "seq", "prev")} == {
        "operation": ROTATE_OPERATION, "reason": "sighup", "previous_file": target.name,
        "seq": 3, "prev": sha(old[-1])}
    assert json.loads(head_path(log_path).read_bytes()) == {"seq": 4, "sha256": sha(new[-1])}
    assert not head_path(target).exists()  # the head keeps naming the chain's end
    whole = verify_files([target, log_path])
    assert whole.ok and whole.lines == 4, whole
    assert "across 2 files" in whole.reason and "end matches the head file (seq 4)" in whole.reason
    alone = verify(log_path)  # the live file alone says what it continues
    assert alone.ok and f"starts at seq 3, continuing {target.name}" in alone.reason
    rotated = [r for r in caplog.records if r.getMessage() == "audit log rotated"]
    assert [r.fields["seq"] for r in rotated] == [3]  # type: ignore[attr-defined]


def test_an_empty_file_is_not_rotated(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        assert log.rotate() is None
        assert log.seq == 0
    assert rotated_files(log_path) == []


def test_names_are_unique_and_sort_in_chain_order(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        for i in range(5):  # five rotations within a second or two
            log.write(record(i))
            log.rotate()
    files = rotated_files(log_path)
    assert len(files) == 5
    firsts = [json.loads(lines_of(p)[0])["seq"] for p in files]
    assert firsts == sorted(firsts)
    # a restart rotates after the names already taken, even those a second ahead
    with AuditLog(log_path) as log:
        log.write(record(9))
        log.rotate()
    assert verify_files(chain_of(log_path)).ok


def test_max_bytes_rotates_by_size(log_path: Path) -> None:
    limit = 4096
    with AuditLog(log_path, max_bytes=limit) as log:
        for i in range(100):
            log.write(record(i))
    files = chain_of(log_path)
    assert len(files) >= 4
    longest = max(len(line) for p in files for line in lines_of(p)) + 1
    for p in files[:-1]:
        assert limit <= p.stat().st_size < limit + longest, p
        assert json.loads(lines_of(p)[-1])["operation"] == "sign"
    for p in files[1:]:
        assert json.loads(lines_of(p)[0])["reason"] == "max_bytes"
    result = verify_files(files)
    assert result.ok and result.lines == 100 + len(files) - 1, result


def test_max_bytes_must_be_positive(log_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AuditLog(log_path, max_bytes=0)


def test_config_max_bytes() -> None:
    base = {"tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t",
                        "pin_env": "P"}]}
    assert parse_config({**base, "audit": {"file": "a.log"}}, Path("/")).audit_max_bytes is None
    cfg = parse_config({**base, "audit": {"file": "a.log", "max_bytes": 1 << 20}}, Path("/"))
    assert cfg.audit_max_bytes == 1 << 20
    for bad, message in [(100, "between 4096 and"), (1 << 41, "between 4096 and"),
                         ("1M", "must be an integer"),
                         ({"max_byte": 1}, "unknown keys in \\[audit\\]")]:
        table = {"file": "a.log", **(bad if isinstance(bad, dict) else {"max_bytes": bad})}
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "audit": table}, Path("/"))


def test_a_rotation_that_fails_keeps_logging_in_the_current_file(
        log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = log_path.with_name(".audit.log.next")
    with caplog.at_level(logging.ERROR, logger="signerd.audit"), AuditLog(log_path) as log:
        log.write(record(1))
        blocker.mkdir()  # the new file cannot be created
        (blocker / "x").write_text("")
        with pytest.raises(Unavailable, match="cannot be rotated"):
            log.rotate()
        log.max_bytes = 4096
        for i in range(2, 40):  # past max_bytes: logged, and every line still written
            log.write(record(i))
        assert log.seq == 39
        shutil.rmtree(blocker)
        assert log.rotate() is not None  # works again
    assert sum("rotation failed" in r.getMessage() for r in caplog.records) == 1  # retried later
    assert verify_files(chain_of(log_path)).ok


def test_a_rotation_that_fails_at_the_switch_is_undone(
        log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def refuse(src: Any, dst: Any) -> None:
        if Path(src).name == ".audit.log.next":
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    with AuditLog(log_path) as log:
        log.write(record(1))
        monkeypatch.setattr("signerd.audit._rotation.os.rename", refuse)
        with pytest.raises(Unavailable, match="cannot be rotated: Input/output error"):
            log.rotate()
        monkeypatch.undo()
        log.write(record(2))  # still in the same file
    assert rotated_files(log_path) == [] and not log_path.with_name(".audit.log.next").exists()
    assert [json.loads(x)["seq"] for x in lines_of(log_path)] == [1, 2]
    assert verify(log_path).ok


def test_a_line_that_cannot_be_written_after_a_rename_fails_closed(tmp_path: Path) -> None:
    """Another program renamed the log; the new file cannot take the rotation
    record (the file system is full), so the request's line is not written
    either."""
    with small_fs(tmp_path / "fs") as fs:
        log_path = fs.path / "audit.log"
        with AuditLog(log_path) as log:
            log.write(record(1))
            log_path.rename(log_path.with_name("audit.log.1"))
            fs.fill()
            with pytest.raises(Unavailable, match="No space left"):
                log.write(record(2))
            assert log.seq == 1
            fs.free()
            log.write(record(2))
        assert verify_files([log_path.with_name("audit.log.1"), log_path]).ok


# -- renamed by another program (logrotate without copytruncate)


def test_sigusr1_after_an_external_rename_does_not_rotate_twice(log_path: Path) -> None:
    moved = log_path.with_name("audit.log.20200101T000000Z")
    with AuditLog(log_path) as log:
        log.write(record(1))
        log_path.rename(moved)  # logrotate: rename, nocreate, then postrotate SIGUSR1
        assert log.rotate() is None  # the chain continues in a new file at the path
        log.write(record(2))
    assert rotated_files(log_path) == [moved]
    first = json.loads(lines_of(log_path)[0])
    assert (first["reason"], first["previous_file"]) == ("renamed", None)
    assert verify_files([moved, log_path]).ok


@pytest.mark.parametrize("leftover", ["no-file", "empty-file"])
def test_a_log_renamed_while_stopped_is_continued(log_path: Path, leftover: str) -> None:
    """logrotate renamed the log while signerd was stopped (nocreate: no file;
    create: an empty one). The start finds the renamed file by the head's
    line and links the new file to it, instead of refusing to start."""
    with AuditLog(log_path) as log:
        for i in range(3):
            log.write(record(i))
    moved = log_path.with_name("audit.log.20200101T000000Z")
    log_path.rename(moved)
    if leftover == "empty-file":
        log_path.write_bytes(b"")
    with AuditLog(log_path) as log:
        assert log.seq == 4  # the rotation record is written at once
        log.write(record(4))
    first = json.loads(lines_of(log_path)[0])
    assert (first["reason"], first["previous_file"], first["prev"]) == (
        "renamed", moved.name, sha(lines_of(moved)[-1]))
    assert verify_files([moved, log_path]).ok


def test_a_log_renamed_and_edited_while_stopped_still_stops_the_start(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        for i in range(3):
            log.write(record(i))
    moved = log_path.with_name("audit.log.20200101T000000Z")
    log_path.rename(moved)
    moved.write_bytes(moved.read_bytes().replace(b"req-2", b"req-9"))
    with pytest.raises(ConfigError, match="ends at seq 0 but its head file records seq 3"):
        AuditLog(log_path)


# -- crash in the middle of a rotation


@pytest.mark.parametrize("linked", [True, False], ids=["after-the-link", "before-the-link"])
def test_start_finishes_or_undoes_an_interrupted_rotation(
        log_path: Path, monkeypatch: pytest.MonkeyPatch, linked: bool) -> None:
    real_rename = os.rename

    class Crash(Exception):
        pass

    def crash_rename(src: Any, dst: Any) -> None:
        if Path(src).name == ".audit.log.next":
            raise Crash  # the process dies before the new file takes the path
        real_rename(src, dst)

    def crash_link(src: Any, dst: Any) -> None:
        raise Crash

    log = AuditLog(log_path)
    log.write(record(1))
    log.write(record(2))
    monkeypatch.setattr("signerd.audit._rotation.os.rename", crash_rename)
    if not linked:
        monkeypatch.setattr("signerd.audit._rotation.os.link", crash_link)
    with pytest.raises(Crash):
        log.rotate()
    monkeypatch.undo()
    # The process is gone, and with it its files and locks.
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if Path(target).parent == log_path.parent:
            os.close(int(fd))
    log._files.fd = log._files.head_fd = None
    assert log_path.with_name(".audit.log.next").exists()
    with AuditLog(log_path) as again:
        assert again.seq == (3 if linked else 2)
        again.write(record(3))
    assert not log_path.with_name(".audit.log.next").exists()
    files = chain_of(log_path)
    assert len(files) == (2 if linked else 1)
    result = verify_files(files)
    assert result.ok and result.lines == (4 if linked else 3), result


# -- verify_files: what it names


def test_verify_files_of_an_intact_sequence_and_of_gzip(log_path: Path) -> None:
    first, second, live = three_files(log_path)
    assert verify_files([first, second, live]).ok
    packed = second.with_name(second.name + ".gz")
    packed.write_bytes(gzip.compress(second.read_bytes()))  # logrotate's "compress"
    second.unlink()
    result = verify_files([first, packed, live])
    assert result.ok and result.lines == 14, result


def test_verify_files_names_a_missing_middle_file(log_path: Path) -> None:
    first, second, live = three_files(log_path)
    result = verify_files([first, live])
    assert (result.ok, result.problem, result.path, result.first_bad_line) == (
        False, "missing", str(live), 1)
    assert result.reason == (f"{second.name} is missing (seq 5..9): {live} starts at seq 10 "
                             f"but {first} ends at seq 4")


def test_verify_files_names_files_out_of_order(log_path: Path) -> None:
    first, second, live = three_files(log_path)
    swapped = verify_files([second, first, live])
    assert (swapped.problem, swapped.path, swapped.first_bad_line) == ("reordered", str(first), 1)
    assert swapped.reason.startswith(f"files out of order or repeated: {first} starts at seq 1, "
                                     f"but {second} before it ends at seq 9")
    late = verify_files([first, live, second])
    assert (late.problem, late.path) == ("reordered", str(live))
    assert late.reason == (f"files out of order: {second} (from seq 5) must come before {live} "
                           "(from seq 10)")
    twice = verify_files([first, first, second, live])
    assert (twice.problem, twice.path) == ("reordered", str(first))


def edit(path: Path, n: int, old: bytes, new: bytes) -> None:
    lines = lines_of(path)
    assert old in lines[n - 1]
    lines[n - 1] = lines[n - 1].replace(old, new)
    path.write_bytes(b"".join(x + b"\n" for x in lines))


@pytest.mark.parametrize(("mutate", "which", "line", "problem", "reason"), [
    pytest.param(lambda f: edit(f[1], 3, b"runner", b"mallory"), 1, 3, "edited",
                 "line edited (hash does not match line 4's prev)", id="middle-of-a-file"),
    pytest.param(lambda f: edit(f[0], 4, b"runner", b"mallory"), 0, 4, "edited",
                 "line edited (hash does not match the prev of {f1} line 1)",
                 id="last-line-of-a-rotated-file"),
    pytest.param(lambda f: edit(f[1], 1, b'"sighup"', b'"max_bytes"'), 1, 1, "edited",
                 "line edited (hash does not match line 2's prev)", id="rotation-record"),
    pytest.param(lambda f: f[0].write_bytes(b"".join(x + b"\n" for x in lines_of(f[0])[:-2])),
                 0, 3, "truncated",
                 "lines missing at the end: truncated ({f0} ends at seq 2; {f1} continues it "
                 "from seq 4)", id="end-of-a-rotated-file-cut"),
    pytest.param(lambda f: f[1].write_bytes(b"".join(x + b"\n" for x in lines_of(f[1])[:3]
                                                     + lines_of(f[1])[4:])),
                 1, 4, "deleted", "line(s) removed before this line (seq jumps from 7 to 9)",
                 id="line-removed-in-a-rotated-file"),
    pytest.param(lambda f: f[2].write_bytes(b"".join(x + b"\n" for x in lines_of(f[2])[:-1])),
                 2, 5, "truncated",
                 "lines missing at the end: truncated (the file ends at seq 13; the head file "
                 "records seq 14)", id="end-of-the-live-file-cut"),
])
def test_verify_files_names_the_file_and_line(
        log_path: Path, mutate: Callable[[list[Path]], None], which: int, line: int,
        problem: str, reason: str) -> None:
    files = three_files(log_path)
    mutate(files)
    result = verify_files(files)
    assert (result.ok, result.problem, result.path, result.first_bad_line) == (
        False, problem, str(files[which]), line), result
    assert result.reason == reason.format(**{f"f{i}": str(p) for i, p in enumerate(files)})


def test_a_head_file_among_the_files_is_named(log_path: Path) -> None:
    files = three_files(log_path)
    result = verify_files([*files, head_path(log_path)])
    assert (result.ok, result.problem, result.path) == (False, "head", str(head_path(log_path)))
    assert "is a head file, not a log" in result.reason


def test_a_rotated_file_alone_and_a_leading_gap(log_path: Path) -> None:
    first, second, live = three_files(log_path)
    # The oldest files expired: the rest still verifies, and says where it starts.
    result = verify_files([second, live])
    assert result.ok and f"starts at seq 5, continuing {first.name}" in result.reason
    # A file whose first lines were cut (not a rotation record first) does not.
    second.write_bytes(b"".join(x + b"\n" for x in lines_of(second)[1:]))
    cut = verify_files([second, live])
    assert (cut.problem, cut.path, cut.first_bad_line) == ("deleted", str(second), 1)


# -- a real daemon, under load


def _client(certs: PKI, port: int) -> Client:
    cert, key = certs.files["admin"]
    return Client(ClientConfig(f"127.0.0.1:{port}", certs.ca_file, cert, key, "localhost", 30))


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signerd.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _load(certs: PKI, port: int, key_id: str, seconds: float, callers: int,
          during: Callable[[], None]) -> tuple[int, int]:
    """Sign from ``callers`` threads for ``seconds`` while ``during`` runs in
    this thread; (signatures made, calls failed)."""
    stop = threading.Event()
    counts = [0, 0]
    lock = threading.Lock()

    def caller() -> None:
        with _client(certs, port) as c:
            while not stop.is_set():
                try:
                    c.sign(key_id, message=os.urandom(16))
                    ok = 0
                except grpc.RpcError:
                    ok = 1
                with lock:
                    counts[ok] += 1

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + seconds
        during()
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return counts[0], counts[1]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_rotation_under_load_keeps_one_chain(hsm: HSM, certs: PKI, tmp_path: Path,
                                             workers: int) -> None:
    data = daemon_config(hsm, certs, tmp_path, server={"workers": workers})
    data["audit"]["max_bytes"] = 32 * 1024
    cfg = write_toml(tmp_path / "signerd.toml", data)
    proc = spawn_daemon(cfg, tmp_path)
    port = proc.info["tcp"]
    try:
        with _client(certs, port) as c:
            key = c.create_key(unique_gun(), "targets", purpose="raw").key_id

        def rotations() -> None:
            for _ in range(4):
                time.sleep(0.4)
                proc.proc.send_signal(signal.SIGUSR1)

        signed, failed = _load(certs, port, key, 2.5, 8, rotations)
    finally:
        assert proc.stop() == 0
    assert failed == 0 and signed > 200
    names = ["audit.log"] if workers == 1 else [f"audit.log.w{i}" for i in range(1, workers + 1)]
    reasons: dict[str, int] = {}
    sign_lines = 0
    for name in names:
        files = chain_of(tmp_path / name)
        run = _ctl("audit", "verify", *map(str, files))
        assert run.returncode == 0, run.stdout + run.stderr
        if len(files) > 1:
            assert run.stdout.startswith(f"{files[0]} .. {files[-1]}: OK: {len(files)} files")
        for p in files:
            for line in lines_of(p):
                doc = json.loads(line)
                if doc.get("operation") == ROTATE_OPERATION:
                    reasons[doc["reason"]] = reasons.get(doc["reason"], 0) + 1
                elif doc.get("operation") == "sign":
                    sign_lines += doc["status"] == "OK"
    assert sign_lines == signed  # every signature has its line, across all the files
    assert reasons.get("max_bytes", 0) >= 2 and reasons.get("sigusr1", 0) >= 1, reasons


SEPARATE_POLICY = f"""
[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["create", "read", "sign", "delete"]
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sighup_reloads_the_policy_only_and_sigusr1_rotates_the_log_only(
        hsm: HSM, certs: PKI, tmp_path: Path, workers: int) -> None:
    """Regression (issue 21 §7): every SIGHUP, meant to reload the policy, also
    rotated the audit log. Now SIGHUP reloads the policy and leaves the log
    whole; SIGUSR1 rotates the log (every worker's) and leaves the policy."""
    data = daemon_config(hsm, certs, tmp_path, server={"workers": workers})
    cfg = write_toml(tmp_path / "signerd.toml", data)
    policy = Path(data["policy"]["file"])
    if not policy.is_absolute():
        policy = tmp_path / policy
    proc = spawn_daemon(cfg, tmp_path)
    names = ["audit.log"] if workers == 1 else [f"audit.log.w{i}" for i in range(1, workers + 1)]
    try:
        with _client(certs, proc.info["tcp"]) as c:
            c.create_key(unique_gun(), "targets")
            # 1. SIGHUP: the policy is reloaded (the admin may no longer create
            #    keys), the log is not rotated.
            policy.write_text(SEPARATE_POLICY.replace('"create", ', ""))
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while True:
                try:
                    c.create_key(unique_gun(), "targets")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
                    break
                assert time.monotonic() < deadline, "the policy was not reloaded on SIGHUP"
                time.sleep(0.1)
            time.sleep(0.3)  # every worker has taken it
            assert [p for n in names for p in rotated_files(tmp_path / n)] == []
            # 2. SIGUSR1: every log is rotated (but an empty one: a worker that
            #    served no request), the policy file is not read again.
            policy.write_text(SEPARATE_POLICY)
            names = [n for n in names if (tmp_path / n).stat().st_size]
            assert names
            proc.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while not all(rotated_files(tmp_path / n) for n in names):
                assert time.monotonic() < deadline, "no rotation after SIGUSR1"
                time.sleep(0.05)
            err = None
            try:
                c.create_key(unique_gun(), "targets")
            except grpc.RpcError as e:
                err = e
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert proc.stop() == 0
    for name in names:
        files = chain_of(tmp_path / name)
        assert len(files) == 2, files
        reasons = [json.loads(line).get("reason") for p in files for line in lines_of(p)
                   if json.loads(line).get("operation") == ROTATE_OPERATION]
        assert reasons == ["sigusr1"]
        assert verify_files(files).ok


def test_signerctl_audit_verify_names_a_missing_file(hsm: HSM, certs: PKI,
                                                     tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "signerd.toml", daemon_config(hsm, certs, tmp_path))
    proc = spawn_daemon(cfg, tmp_path)
    try:
        with _client(certs, proc.info["tcp"]) as c:
            key = c.create_key(unique_gun(), "targets", purpose="raw").key_id
            for n in range(1, 4):
                c.sign(key, message=b"x")
                proc.proc.send_signal(signal.SIGUSR1)
                deadline = time.monotonic() + 20
                while len(rotated_files(tmp_path / "audit.log")) < n:
                    assert time.monotonic() < deadline, "no rotation after SIGUSR1"
                    time.sleep(0.05)
            c.sign(key, message=b"y")
    finally:
        assert proc.stop() == 0
    files = chain_of(tmp_path / "audit.log")
    assert len(files) == 4
    ok = _ctl("audit", "verify", "--json", *map(str, files))
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    gone = _ctl("audit", "verify", *map(str, [files[0], files[2], files[3]]))
    assert gone.returncode == 1 and gone.stdout == ""  # a failure is said on stderr
    assert gone.stderr.strip() == (
        f"signerctl: {files[2]}: chain broken at line 1: {files[1].name} is missing (seq "
        f"{json.loads(lines_of(files[1])[0])['seq']}..{json.loads(lines_of(files[1])[-1])['seq']})"
        f": {files[2]} starts at seq {json.loads(lines_of(files[2])[0])['seq']} but {files[0]} "
        f"ends at seq {json.loads(lines_of(files[0])[-1])['seq']}")
    single = _ctl("audit", "verify", str(files[-1]))  # the live file alone still verifies
    assert single.returncode == 0 and f"continuing {files[2].name}" in single.stdout
