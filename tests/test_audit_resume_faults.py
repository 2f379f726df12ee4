"""Audit logs a start must not continue, or must look for: what
:func:`signerd.audit.check_resumable` (check-config) and AuditLog (a start)
say of a log that is a symbolic link or a directory, whose last line is no
line at all, that another process is rotating, or that logrotate renamed
beside a file that is not the log's."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import pytest

from signerd.audit import AuditLog, check_resumable
from signerd.audit._line import MAX_LINE_BYTES
from signerd.errors import ConfigError


def _write_log(path: Path, n: int) -> int:
    """A log of ``n`` records (after the log's own opening ones); its last seq."""
    with AuditLog(path) as log:
        for i in range(n):
            log.write({"operation": "sign", "request_id": f"req-{i}"})
        return log.seq


def test_a_symbolic_link_at_the_log_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.log"
    _write_log(real, 2)
    link = tmp_path / "audit.log"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as e:
        check_resumable(link)
    assert str(e.value) == f"audit log {link}: cannot open: Too many levels of symbolic links"


def test_a_directory_at_the_log_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.mkdir()
    with pytest.raises(ConfigError) as e:
        check_resumable(path)
    assert str(e.value) == f"audit log {path}: cannot read: Is a directory"


def test_a_last_line_longer_than_any_record_is_refused(tmp_path: Path) -> None:
    """Only the end of the log is read, in windows growing to twice the
    longest line and one step past: a file of one huge line is refused, not
    read whole."""
    path = tmp_path / "audit.log"
    path.write_bytes(b"x" * (5 * MAX_LINE_BYTES) + b"\n")
    with pytest.raises(ConfigError) as e:
        check_resumable(path)
    assert str(e.value) == (f"audit log {path}: the last line is longer than {MAX_LINE_BYTES} "
                            f"bytes: not an audit record; run 'signerctl audit verify {path}'")


def test_a_log_another_process_is_rotating_is_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _write_log(path, 1)
    nxt = tmp_path / ".audit.log.next"
    fd = os.open(nxt, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the rotating process holds its new file
        with pytest.raises(ConfigError) as e:
            AuditLog(path)
    finally:
        os.close(fd)
    assert str(e.value) == f"audit log {path}: cannot open: another process is rotating it"
    assert nxt.exists()  # not taken away from under the other process


def test_a_renamed_log_is_found_among_siblings_that_are_not_it(tmp_path: Path) -> None:
    """logrotate renamed the log while signerd was stopped; beside it lie a
    torn file, an empty one, a FIFO (whose open would block) and a dangling
    link: all are passed over."""
    path = tmp_path / "audit.log"
    last = _write_log(path, 3)
    path.rename(tmp_path / "audit.log.1")
    (tmp_path / "audit.log.torn").write_bytes(b'{"seq": 1, "prev": "00')
    (tmp_path / "audit.log.empty").touch()
    os.mkfifo(tmp_path / "audit.log.pipe")  # not a regular file: never opened
    (tmp_path / "audit.log.gone").symlink_to(tmp_path / "nowhere")
    assert check_resumable(path) == (last, "audit.log.1")


def test_a_head_whose_renamed_log_cannot_be_found_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    last = _write_log(path, 3)
    path.rename(tmp_path / "audit.log.1")
    (tmp_path / "audit.log.1").write_bytes(b'{"seq": 1, "prev": "00')  # torn: not it
    with pytest.raises(ConfigError, match=re.escape(
            f"audit log {path}: ends at seq 0 but its head file records seq {last}: lines "
            "were removed or edited")):
        check_resumable(path)


class _RefusingTree:
    """A tree sink (signerd.audit.TreeSink) whose checkpoint key cannot sign yet: its
    open raises what a token that is away makes a checkpoint signature raise."""

    def open(self, path: Path, seq: int, last: str) -> None:
        from signerd.errors import Unavailable

        raise Unavailable("token root is not usable")

    def append(self, lines: object) -> None:
        raise AssertionError("no line is written before open succeeds")


def test_a_tree_that_cannot_open_leaves_a_head_the_next_start_reads(tmp_path: Path) -> None:
    """An attack session's finding: a first start whose checkpoint could not be signed
    left an empty head file, and every later start was refused ("head file ... is
    malformed"). The head is written before the tree is asked, and the files are closed."""
    from signerd.errors import Unavailable

    path = tmp_path / "audit.log"
    with pytest.raises(Unavailable):
        AuditLog(path, tree=_RefusingTree())
    assert (tmp_path / "audit.log.head").stat().st_size > 0
    log = AuditLog(path)  # the lock was released, and the head is one a start reads
    log.write({"operation": "test"})
    log.close()
    with pytest.raises(Unavailable):
        AuditLog(path, tree=_RefusingTree())  # with a line in it, too
    AuditLog(path).close()
