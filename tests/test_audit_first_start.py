"""A first start of an audit directory serves before its checkpoint key is
chosen (issue 24: a daemon of 10,000 keys serves within 0.5 s of its
module's C_Initialize, and choosing the key needs the first listing, seconds
at that size). The log's tree is kept in memory from the log's open, and
started on disk once the key is known: every line written meanwhile is a
leaf, the first checkpoint covers them, and a restart's start check passes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd import metrics
from signerd.audit import AuditLog, Checkpointer, CheckpointKey, TlogConfig, tree_dir
from signerd.errors import ConfigError, Unavailable
from signerd.tlog import merkle
from signerd.tlog.merkle import MemoryHashes, leaf_hash
from signerd.tlog.note import Checkpoint, Note, Verifier


@pytest.fixture(scope="module")
def key() -> CheckpointKey:
    """A software Ed25519 key: where the key lives does not matter to the tree (the
    daemon test below uses the token's)."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return CheckpointKey(public, private.sign, "test")


def _config(interval: float = 60.0) -> TlogConfig:
    return TlogConfig(interval=interval, origin="test.example/first")


def _write(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.write({"operation": "Sign", "request_id": f"r{i}", "decision": "allow"})


def _checkpoint_of(path: Path) -> Checkpoint:
    return Checkpoint.parse(Note.parse((tree_dir(path) / "checkpoint").read_bytes()).text)


def _root_of_lines(path: Path, base: int) -> tuple[int, bytes]:
    """(size, root) of the tree whose leaves are the log's lines after seq ``base``."""
    mem = MemoryHashes()
    for line in path.read_bytes().splitlines()[base:]:
        mem.append(leaf_hash(line))
    return mem.size, merkle.root(mem, mem.size)


class _Chooser:
    """A checkpoint-key chooser held until :meth:`release`; ``answers`` are
    returned (or raised) one per call, the last one for every further call."""

    def __init__(self, *answers: CheckpointKey | Exception | None) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.go = threading.Event()

    def __call__(self) -> CheckpointKey | None:
        self.go.wait(30)
        self.calls += 1
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def release(self) -> None:
        self.go.set()


def _open(path: Path, chooser: _Chooser, interval: float = 60.0) -> tuple[AuditLog, Checkpointer]:
    cp = Checkpointer(None, _config(interval), metrics, choose=chooser)
    log = AuditLog(path, tree=cp)
    cp.start(log)
    return log, cp


def test_lines_written_before_the_key_is_chosen_are_leaves_of_the_first_checkpoint(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    chooser = _Chooser(key)
    log, cp = _open(path, chooser)
    _write(log, 5)  # serving: the lines are written, the key is not chosen yet
    # Only tree.json, with the base, written at open: the key is still being chosen.
    assert sorted(p.name for p in tree_dir(path).iterdir()) == ["tree.json"]
    assert json.loads((tree_dir(path) / "tree.json").read_text())["base"] == 0
    assert cp.serve("/checkpoint") == (404, b"not found\n", "text/plain")
    assert cp.serve("/tile/0/000") == (404, b"not found\n", "text/plain")
    assert cp.serve("/metrics") is None
    assert cp.failure() is None  # nothing has failed: the daemon is ready
    assert cp.checkpoint() is None
    chooser.release()
    assert cp.wait_started(10)
    assert json.loads((tree_dir(path) / "tree.json").read_text())["base"] == 0
    lines = path.read_bytes().splitlines()
    record = json.loads(lines[-1])
    assert record["operation"] == "audit.tree_start" and record["base"] == 0
    assert record["seq"] == 6  # after the five lines served before it
    signed = cp.checkpoint()
    assert signed is not None
    assert (signed.size, signed.root) == _root_of_lines(path, 0) == (6, signed.root)
    vkey = (tree_dir(path) / "vkey").read_text().strip()
    assert Note.parse((tree_dir(path) / "checkpoint").read_bytes()).verified_by(
        Verifier.from_vkey(vkey))
    _write(log, 3, 5)
    cp.stop()
    log.close()
    # A restart with the key: the start check passes and catches up.
    cp2 = Checkpointer(key, _config(), metrics)
    log2 = AuditLog(path, tree=cp2)
    cp2.start(log2)
    _write(log2, 2, 8)
    cp2.stop()
    log2.close()
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 0)


def test_a_token_away_while_choosing_is_retried_and_reported_after_a_grace(
        tmp_path: Path, key: CheckpointKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure worth another try (a token away) is retried every interval; readiness
    says so only once it has lasted TREE_START_GRACE seconds (the token's own readiness
    says it is away at once)."""
    from signerd.audit import _checkpoints

    path = tmp_path / "audit.log"
    chooser = _Chooser(Unavailable("token t1 is not present"))
    log, cp = _open(path, chooser, interval=0.05)
    chooser.release()
    deadline = time.monotonic() + 10
    while chooser.calls < 3:  # retried
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cp.failure() is None and not cp.wait_started(0)  # within the grace
    monkeypatch.setattr(_checkpoints, "TREE_START_GRACE", 0.0)
    assert cp.failure() == "the audit tree has not started: token t1 is not present"
    _write(log, 2)
    chooser.answers = [key]  # the token is back
    assert cp.wait_started(10)
    assert cp.failure() is None
    _write(log, 4, 2)
    cp.stop()
    log.close()
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 0)


def test_a_full_disk_while_starting_the_tree_is_retried(
        tmp_path: Path, key: CheckpointKey) -> None:
    """The tree's files cannot be written (here: a directory where its vkey goes, so
    that the rename onto it fails, even for root) and then can: the tree starts, with
    every line, and what a failed attempt left is written over."""
    path = tmp_path / "audit.log"
    chooser = _Chooser(key)
    log, cp = _open(path, chooser, interval=0.05)
    _write(log, 3)
    (tree_dir(path) / "checkpoint").write_text("left by a failed attempt\n")
    (tree_dir(path) / "vkey").mkdir()
    chooser.release()
    time.sleep(0.5)  # ten intervals: each attempt fails
    assert not cp.wait_started(0)
    (tree_dir(path) / "vkey").rmdir()
    assert cp.wait_started(10)
    assert chooser.calls == 1  # the key was chosen once; only the tree was retried
    cp.stop()
    log.close()
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 0)


def test_a_final_failure_is_reported_and_the_next_start_names_the_lines_in_no_tree(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    chooser = _Chooser(ConfigError("audit checkpoints need an Ed25519 key"))
    log, cp = _open(path, chooser, interval=0.05)
    _write(log, 2)
    chooser.release()
    assert not cp.wait_started(10)
    assert cp.failure() == "audit checkpoints need an Ed25519 key"
    assert chooser.calls == 1  # final: not retried
    _write(log, 2, 2)
    assert cp.checkpoint() is None
    cp.stop()
    log.close()
    # The next start (with its key) starts a tree at the log's end, not refused.
    _restart(path, key)
    assert _start_lines(path) == [(5, 4, [1, 4])]
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 4)


def _start_lines(path: Path) -> list[tuple[int, int, list[int] | None]]:
    """(seq, base, unsigned) of every audit.tree_start line of the log."""
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    return [(r["seq"], r["base"], r.get("unsigned")) for r in records
            if r["operation"] == "audit.tree_start"]


def _restart(path: Path, key: CheckpointKey, lines: int = 1) -> None:
    """A start with ``key`` (its tree is on disk, so it is checked before serving) that
    writes ``lines`` lines and stops."""
    cp = Checkpointer(key, _config(), metrics)
    log = AuditLog(path, tree=cp)
    cp.start(log)
    _write(log, lines, 1000)
    cp.stop()
    log.close()


@pytest.mark.parametrize("left", [(), ("vkey",)], ids=["tree.json", "tree.json+vkey"])
def test_a_crash_before_the_first_checkpoint_does_not_refuse_the_next_start(
        tmp_path: Path, key: CheckpointKey, left: tuple[str, ...]) -> None:
    """Killed while choosing the key, or between the tree's files (tree.json is written
    first, the checkpoint last): nothing was signed. The next start is not refused (an
    attack run saw every restart refused), and it signs none of the lines it cannot
    vouch for: its tree starts at the log's end, and its start line names them."""
    path = tmp_path / "audit.log"
    chooser = _Chooser(ConfigError("killed"))  # the tree never starts in this life
    log, cp = _open(path, chooser)
    _write(log, 6)
    chooser.release()
    assert not cp.wait_started(10)
    log.close()  # no stop: as a SIGKILL leaves it
    for name in left:
        (tree_dir(path) / name).write_text("half written\n")
    _restart(path, key)
    assert _start_lines(path) == [(7, 6, [1, 6])]
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 6)


def test_a_tree_of_only_a_checkpoint_and_no_tree_json_is_still_refused(
        tmp_path: Path, key: CheckpointKey) -> None:
    """tree.json is written first now: a checkpoint without it is no crash of ours."""
    path = tmp_path / "audit.log"
    _restart(path, key)
    (tree_dir(path) / "tree.json").unlink()
    with pytest.raises(ConfigError, match="tree.json is missing but the tree's checkpoint"):
        _restart(path, key)


def test_a_symlinked_tree_directory_is_refused(tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree_dir(path).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        _restart(path, key)
    with pytest.raises(ConfigError, match="appeared while the daemon started"):
        _open(path, _Chooser(key))
    assert list(elsewhere.iterdir()) == []


def test_checkpoints_off_when_no_key_can_be_made(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    chooser = _Chooser(None)
    log, cp = _open(path, chooser, interval=0.05)
    chooser.release()
    assert not cp.wait_started(10)
    assert cp.failure() is None  # off is not a failure (the chooser logged why)
    _write(log, 3)
    cp.stop()
    log.close()
    assert not tree_dir(path).exists()


def test_a_stop_while_choosing_still_starts_the_tree_and_signs_every_line(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    chooser = _Chooser(key)
    log, cp = _open(path, chooser)
    _write(log, 7)
    threading.Timer(0.3, chooser.release).start()
    cp.stop()  # waits for the choice, starts the tree, then the final checkpoint
    log.close()
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 0)
    assert _checkpoint_of(path).size == 8


def test_a_tree_that_appeared_meanwhile_is_not_overwritten(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    chooser = _Chooser(key)
    log, cp = _open(path, chooser, interval=0.05)
    (tree_dir(path) / "tree.json").write_text('{"origin": "x", "base": 0, "epoch": 0}\n')
    chooser.release()
    assert not cp.wait_started(10)
    assert "another tree took the place of" in (cp.failure() or "")
    cp.stop()
    log.close()
    assert (tree_dir(path) / "tree.json").read_text().startswith('{"origin": "x"')


def test_a_checkpointer_needs_its_key_or_a_chooser_and_witnesses_need_the_key(
        key: CheckpointKey) -> None:
    from signerd.audit import WitnessConfig

    with pytest.raises(ValueError, match="needs its key"):
        Checkpointer(None, _config())
    witness = WitnessConfig("w.example", "https://w.example/", key.verifier("w.example"))
    with pytest.raises(ValueError, match="witnesses"):
        Checkpointer(None, TlogConfig(witnesses=(witness,)), choose=lambda: key)


# -- the daemon --------------------------------------------------------------


def test_a_daemons_first_start_serves_and_audits_before_its_key_is_chosen(
        hsm: Any, certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real daemon, its first start held while choosing the checkpoint key on the
    token: it signs, logs the line, is ready and serves no checkpoint yet; once the key
    is chosen, the first checkpoint covers that line and a restart's check passes."""
    import urllib.error
    import urllib.request

    from signerd.server import app
    from tests.conftest import daemon_config, start_daemon, unique_gun

    held = threading.Event()
    real = app.checkpoint_key

    def slow_choice(*a: Any, **kw: Any) -> CheckpointKey:
        held.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(app, "checkpoint_key", slow_choice)
    work = tmp_path / "first"
    cfg = daemon_config(hsm, certs, work, metrics=True)

    def get(port: int, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    d = start_daemon(cfg, certs, work)
    try:
        cp = d.servers.checkpointer
        assert cp is not None and cp.key is None and d.servers.http is not None
        port = d.servers.http.port
        with d.client() as c:
            k = c.create_key(unique_gun(), "targets", purpose="raw")
            c.sign(k.key_id, message=b"signed before the key was chosen")
        assert get(port, "/readyz") == 200
        assert get(port, "/checkpoint") == 404
        held.set()
        assert cp.wait_started(30) and cp.key is not None
        assert cp.checkpoint() is not None
        assert get(port, "/checkpoint") == 200
    finally:
        held.set()
        d.stop()
    log_path = work / "audit.log"
    assert (_checkpoint_of(log_path).size, _checkpoint_of(log_path).root) == \
        _root_of_lines(log_path, 0)
    assert any(b'"operation":"sign"' in line and k.key_id.encode() in line
               for line in log_path.read_bytes().splitlines())
    monkeypatch.setattr(app, "checkpoint_key", real)
    d = start_daemon(cfg, certs, work)  # the restart checks the tree the first start began
    try:
        assert d.servers.checkpointer is not None and d.servers.checkpointer.key is not None
        assert d.servers.checkpointer.key.key_id == cp.key.key_id
    finally:
        d.stop()


def test_checkpoints_asked_for_explicitly_are_chosen_before_serving(
        hsm: Any, certs: Any, tmp_path: Path) -> None:
    """``checkpoints = true`` (or ``checkpoint_algorithm``) that no token can meet refuses
    the start, as it always did: such a first start chooses its key before serving. An
    attack run saw it serve without a tree while its key was being chosen."""
    from tests.conftest import daemon_config, start_daemon

    for setting in ({"checkpoints": True}, {"checkpoint_algorithm": "ecdsa-p256"}):
        work = tmp_path / next(iter(setting))
        cfg = daemon_config(hsm, certs, work)
        cfg["audit"].update(setting)
        d = start_daemon(cfg, certs, work)
        try:
            cp = d.servers.checkpointer
            assert cp is not None and cp.key is not None and cp.state is not None
            assert (tree_dir(work / "audit.log") / "checkpoint").exists()
        finally:
            d.stop()


def test_a_first_start_whose_tokens_make_no_checkpoint_key_runs_without_checkpoints(
        hsm: Any, certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens that list the algorithms but make neither key (the chooser raises
    NoCheckpointToken): without checkpoints asked for, the daemon runs without them, as
    it did when it chose before serving, and leaves no tree behind, so that its next
    start is not refused for a tree it never kept."""
    from signerd.server import app
    from signerd.service import NoCheckpointToken
    from tests.conftest import daemon_config, start_daemon, unique_gun

    def no_key(*a: Any, **kw: Any) -> CheckpointKey:
        raise NoCheckpointToken("audit checkpoints need an Ed25519 or an ECDSA P-256 key")

    monkeypatch.setattr(app, "checkpoint_key", no_key)
    work = tmp_path / "nokey"
    cfg = daemon_config(hsm, certs, work)
    for _ in range(2):  # and the next start too
        d = start_daemon(cfg, certs, work)
        try:
            cp = d.servers.checkpointer
            assert cp is not None and not cp.wait_started(10)
            assert cp.failure() is None and not d.servers.readiness.not_ready()
            with d.client() as c:
                c.create_key(unique_gun(), "targets", purpose="raw")
        finally:
            d.stop()
        assert not tree_dir(work / "audit.log").exists()


def test_a_start_stopped_before_its_start_record_owes_it_to_the_next(
        tmp_path: Path, key: CheckpointKey) -> None:
    """Killed after the empty tree's checkpoint but before the audit.tree_start line (which
    follows the lines served while the key was chosen): the next start writes it, once."""
    path = tmp_path / "audit.log"
    cp = Checkpointer(key, _config(), metrics)
    log = AuditLog(path, tree=cp)  # the tree is on disk; start() would write the record
    _write(log, 3)
    log.close()  # no start, no stop: as a SIGKILL leaves it
    assert (tree_dir(path) / "checkpoint").exists()
    _restart(path, key)
    _restart(path, key)
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    starts = [r for r in records if r["operation"] == "audit.tree_start"]
    assert [(r["seq"], r["base"]) for r in starts] == [(4, 0)]
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 0)


@pytest.mark.parametrize(("tree_json", "refusal"), [
    ('{"origin": "test.example/first", "base": 50, "epoch": 0}', "lines were removed"),
    ('{"origin": "test.example/first", "base": -3, "epoch": 0}', "tree.json is malformed"),
    ('{"origin": "test.example/first", "base": 0}', "tree.json is malformed"),
    ('{"origin": "test.example/first", "base": 2.5, "epoch": 0}', "tree.json is malformed"),
    ('{"origin": "", "base": 2, "epoch": 0}', "tree.json is malformed"),
    ('{"origin": "test.example/first", "base": 2, "epoch": 0}', None),
], ids=["base-past-the-end", "negative-base", "no-epoch", "float-base", "no-origin", "fits"])
def test_a_tree_json_alone_starts_a_tree_only_when_it_fits_the_log(
        tmp_path: Path, key: CheckpointKey, tree_json: str, refusal: str | None) -> None:
    """The finish rule trusts nothing in tree.json it cannot check: a base past the
    log's end, or a malformed file, refuses the start before anything is signed."""
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    _write(log, 5)
    log.close()
    tree_dir(path).mkdir()
    (tree_dir(path) / "tree.json").write_text(tree_json + "\n")
    if refusal is None:
        _restart(path, key)
        assert _start_lines(path) == [(6, 5, [3, 5])]
        assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 5)
        return
    with pytest.raises(ConfigError, match=refusal):
        _restart(path, key)
    assert not (tree_dir(path) / "checkpoint").exists()


def test_a_rewrite_behind_a_deleted_checkpoint_and_tiles_is_never_signed(
        tmp_path: Path, key: CheckpointKey) -> None:
    """An attack run's MEDIUM finding: a tree with signed checkpoints; its checkpoint
    and tiles deleted, tree.json kept, a line forged and the chain recomputed. The
    restart must not sign the forged line into its tree (no inclusion proof for it):
    the new tree starts at the log's end, as after deleting the whole tree directory,
    and its start line names the lines in no tree. (A witness holding the old size
    refuses it outright: see test_audit_tlog's witness tests.)"""
    import shutil

    from tests.test_audit_tlog import _rechain, _rewrite

    path = tmp_path / "audit.log"
    _restart(path, key, lines=20)
    assert _checkpoint_of(path).size == 21
    (tree_dir(path) / "checkpoint").unlink()
    shutil.rmtree(tree_dir(path) / "tile")
    lines = path.read_bytes().splitlines()
    forged = json.loads(lines[4])
    forged["identity"] = "FORGED-IDENTITY"
    lines[4] = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    _rewrite(path, _rechain(lines))
    _restart(path, key)
    assert [s for s in _start_lines(path) if s[2] is not None] == [(22, 21, [1, 21])]
    assert json.loads((tree_dir(path) / "tree.json").read_text())["base"] == 21
    assert (_checkpoint_of(path).size, _checkpoint_of(path).root) == _root_of_lines(path, 21)
