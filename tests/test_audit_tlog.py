"""The audit log as a transparency log (issue 25): tiles, signed checkpoints,
the start check and its attacks, a witness that verifies every proof, and
the daemon's checkpoint key, published tiles and refusals."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd import metrics
from signerd.audit import AuditLog, Checkpointer, CheckpointKey, TlogConfig, tree_dir
from signerd.audit._tlogconfig import parse_tlog
from signerd.errors import ConfigError
from signerd.tlog import merkle
from signerd.tlog.merkle import MemoryHashes, leaf_hash
from signerd.tlog.note import Checkpoint, Note, Verifier, cosignatures
from signerd.tlog.tiles import TileHashes, index_path, parse_tile_path, split_hashes, tile_path
from tests.conftest import started_checkpointer
from tests.tlog_witness import TestWitness


@pytest.fixture(scope="module")
def key() -> CheckpointKey:
    """A software Ed25519 key: the tree and its checks do not depend on where
    the key lives (the daemon tests below use the token's)."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return CheckpointKey(public, private.sign, "test")


@pytest.fixture
def witness() -> Iterator[TestWitness]:
    w = TestWitness()
    yield w
    w.close()


def config(**kw: Any) -> TlogConfig:
    return TlogConfig(interval=kw.pop("interval", 60.0),
                      origin=kw.pop("origin", "test.example/log"),
                      **kw)


def open_log(path: Path, key: CheckpointKey, cfg: TlogConfig | None = None,
             **kw: Any) -> tuple[AuditLog, Checkpointer]:
    cp = Checkpointer(key, cfg or config(), metrics)
    log = AuditLog(path, tree=cp, **kw)
    cp.start(log)
    return log, cp


def write(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.write({"operation": "Sign", "request_id": f"r{i}", "decision": "allow"})


def close(log: AuditLog, cp: Checkpointer) -> None:
    cp.stop()
    log.close()


def all_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# -- tiles -----------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [(0, "000"), (5, "005"), (999, "999"),
                                         (1000, "x001/000"), (1234067, "x001/x234/067")])
def test_tile_index_paths_follow_tlog_tiles(n: int, text: str) -> None:
    assert index_path(n) == text
    assert parse_tile_path(f"tile/0/{text}") == (0, n, 256)
    assert parse_tile_path(f"tile/2/{text}.p/7") == (2, n, 7)
    assert tile_path(1, n, 9) == f"tile/1/{text}.p/9"


@pytest.mark.parametrize("bad", ["tile/0/5", "tile/0/x000/005", "tile/00/005",
                                 "tile/0/005.p/0", "tile/0/005.p/256", "tile/entries/000",
                                 "tile/0/005.p/07", "tile/0/x1/005"])
def test_non_canonical_tile_paths_are_refused(bad: str) -> None:
    assert parse_tile_path(bad) is None


def test_tree_tiles_match_an_in_memory_tree_across_restarts(tmp_path: Path,
                                                            key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    log, cp = open_log(path, key)
    write(log, 700)
    close(log, cp)
    log, cp = open_log(path, key)
    write(log, 300, 700)
    log.rotate()
    write(log, 100, 1000)
    close(log, cp)
    lines = [line for f in sorted(tmp_path.glob("audit.log.2*")) for line in all_lines(f)]
    lines += all_lines(path)
    mem = MemoryHashes()
    for line in lines[0:]:
        mem.append(leaf_hash(line))
    note = Note.parse((tree_dir(path) / "checkpoint").read_bytes())
    ckpt = Checkpoint.parse(note.text)
    # The first line of a new log is the tree's start record; every line is a leaf.
    assert ckpt.size == len(lines) == mem.size
    assert ckpt.root == merkle.root(mem, mem.size)
    assert note.verified_by(key.verifier(ckpt.origin))
    store = TileHashes(ckpt.size, lambda lv, n, w: split_hashes(
        _read_tile(tree_dir(path), lv, n, w)))
    for old in (1, 255, 256, 257, 700, ckpt.size):
        merkle.verify_consistency(old, ckpt.size, merkle.root(mem, old), ckpt.root,
                                  merkle.consistency_proof(store, old, ckpt.size))
    merkle.verify_inclusion(leaf_hash(lines[512]), 512, ckpt.size,
                            merkle.inclusion_proof(store, 512, ckpt.size), ckpt.root)


def _read_tile(directory: Path, level: int, n: int, width: int) -> bytes:
    full = directory / tile_path(level, n)
    if full.exists():
        return full.read_bytes()[:width * 32]
    return (directory / tile_path(level, n, width)).read_bytes()


def test_checkpoint_covers_only_synced_lines_and_comes_within_the_interval(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    log, cp = open_log(path, key, config(interval=0.1))
    write(log, 5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ckpt = Checkpoint.parse(Note.parse((tree_dir(path) / "checkpoint").read_bytes()).text)
        if ckpt.size == 6:
            break
        time.sleep(0.05)
    assert ckpt.size == 6
    assert cp.checkpoint() is None  # nothing new: never a second checkpoint of a size
    close(log, cp)


# -- the attacks -----------------------------------------------------------


def _stopped_log(tmp_path: Path, key: CheckpointKey, n: int = 50) -> Path:
    path = tmp_path / "audit.log"
    log, cp = open_log(path, key)
    write(log, n)
    close(log, cp)
    return path


def _rechain(lines: list[bytes]) -> list[bytes]:
    """Recompute seq and prev over edited lines, as an attacker would."""
    out: list[bytes] = []
    prev = "0" * 64
    for i, line in enumerate(lines):
        doc = json.loads(line)
        doc["prev"], doc["seq"] = prev, i + 1
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        out.append(raw)
        prev = hashlib.sha256(raw).hexdigest()
    return out


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    last = lines[-1]
    head = f'{{"seq":{len(lines)},"sha256":"{hashlib.sha256(last).hexdigest()}"}}'
    path.with_name(path.name + ".head").write_bytes(head.ljust(127).encode() + b"\n")


def test_lines_deleted_while_stopped_refuse_the_start(tmp_path: Path,
                                                      key: CheckpointKey) -> None:
    path = _stopped_log(tmp_path, key)
    _rewrite(path, all_lines(path)[:40])  # head file rewritten too: only the tree knows
    with pytest.raises(ConfigError, match="ends at seq 40 but its checkpoint covers seq 51"):
        open_log(path, key)


def test_a_line_edited_and_the_chain_recomputed_refuses_the_start(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = _stopped_log(tmp_path, key)
    lines = all_lines(path)
    lines[10] = lines[10].replace(b'"allow"', b'"deny"')
    _rewrite(path, _rechain(lines))
    with pytest.raises(ConfigError, match="is not the line the checkpoint signed"):
        open_log(path, key)


def test_the_checkpoint_file_deleted_refuses_the_start(tmp_path: Path,
                                                       key: CheckpointKey) -> None:
    path = _stopped_log(tmp_path, key)
    (tree_dir(path) / "checkpoint").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint is missing \(deleted\?\)") as e:
        open_log(path, key)
    assert "\n" not in str(e.value)


def test_the_checkpoint_file_rolled_back_refuses_the_start(tmp_path: Path,
                                                           key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    log, cp = open_log(path, key)
    write(log, 20)
    cp.checkpoint()
    old = (tree_dir(path) / "checkpoint").read_bytes()
    write(log, 20, 20)
    close(log, cp)
    # Rolled back, and the log cut to match it: the tiles of the old size are gone.
    (tree_dir(path) / "checkpoint").write_bytes(old)
    _rewrite(path, all_lines(path)[:21])
    with pytest.raises(ConfigError, match="checkpoint was rolled back"):
        open_log(path, key)


def test_a_checkpoint_signed_by_another_key_refuses_the_start(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = _stopped_log(tmp_path, key)
    other = Ed25519PrivateKey.generate()
    pub = other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(ConfigError, match="not signed by this log's checkpoint key"):
        open_log(path, CheckpointKey(pub, other.sign))


def test_reset_is_explicit_one_shot_and_audited(tmp_path: Path, key: CheckpointKey) -> None:
    path = _stopped_log(tmp_path, key)
    (tree_dir(path) / "checkpoint").unlink()
    with pytest.raises(ConfigError) as e:
        open_log(path, key)
    reset = str(e.value).split('reset = "')[1][:64]
    log, cp = open_log(path, key, config(reset=reset))
    record = json.loads(all_lines(path)[-1])
    assert record["operation"] == "audit.tree_reset"
    assert "checkpoint is missing" in record["reason"]
    assert record["origin"] == "test.example/log/reset1"
    close(log, cp)
    assert list(tmp_path.glob("audit.log.tlog.abandoned-*"))
    log, cp = open_log(path, key, config(reset=reset))  # left in the config: no effect
    close(log, cp)


def test_a_compressed_rotated_file_is_read_when_the_checkpoint_ends_in_it(
        tmp_path: Path, key: CheckpointKey) -> None:
    path = tmp_path / "audit.log"
    log, cp = open_log(path, key)
    write(log, 30)
    cp.stop()
    log.close()
    log2 = AuditLog(path)  # a rotation while checkpoints were off
    rotated = log2.rotate()
    log2.close()
    assert rotated is not None
    rotated.with_name(rotated.name + ".gz").write_bytes(gzip.compress(rotated.read_bytes()))
    rotated.unlink()
    log, cp = open_log(path, key)
    close(log, cp)


# -- witnesses -------------------------------------------------------------


def test_a_witness_cosigns_every_checkpoint_after_verifying_its_proof(
        tmp_path: Path, key: CheckpointKey, witness: TestWitness) -> None:
    path = tmp_path / "audit.log"
    wcfg = parse_tlog({"witnesses": [witness.config()]}).witnesses
    cfg = config(witnesses=wcfg)
    witness.logs["test.example/log"] = key.verifier("test.example/log")
    log, cp = open_log(path, key, cfg)
    for round_ in range(3):
        write(log, 37, 37 * round_)
        cp.checkpoint()
        _wait(lambda: witness.held.get("test.example/log", (0,))[0] == cp.state.checkpoint.size)
    _wait(lambda: b"witness.test" in (cp.serve("/checkpoint") or (0, b""))[1])
    served = Note.parse(cp.serve("/checkpoint")[1])  # type: ignore[index]
    assert cosignatures(served, [witness.verifier]) .keys() == {"witness.test"}
    assert served.verified_by(key.verifier("test.example/log"))
    assert cp.alarms() == []
    close(log, cp)


def _wait(cond: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_rewritten_history_with_its_tree_deleted_is_refused_by_the_witness(
        tmp_path: Path, key: CheckpointKey, witness: TestWitness) -> None:
    """The whole tree directory deleted and the log rewritten: locally this
    looks like a first start, but the witness holds the old size."""
    path = tmp_path / "audit.log"
    cfg = config(witnesses=parse_tlog({"witnesses": [witness.config()]}).witnesses)
    witness.logs["test.example/log"] = key.verifier("test.example/log")
    log, cp = open_log(path, key, cfg)
    write(log, 40)
    cp.checkpoint()
    _wait(lambda: witness.held.get("test.example/log", (0,))[0] == 41)
    close(log, cp)
    import shutil

    shutil.rmtree(tree_dir(path))
    lines = all_lines(path)
    _rewrite(path, _rechain(lines[:10]))
    with pytest.raises(ConfigError, match="witness witness.test holds size 41"):
        open_log(path, key, cfg)


def test_a_witness_refusing_the_proof_raises_the_alarm(
        tmp_path: Path, key: CheckpointKey, witness: TestWitness,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    cfg = config(witnesses=parse_tlog({"witnesses": [witness.config()]}).witnesses)
    witness.logs["test.example/log"] = key.verifier("test.example/log")
    log, cp = open_log(path, key, cfg)
    write(log, 10)
    cp.checkpoint()
    _wait(lambda: witness.held.get("test.example/log", (0,))[0] == 11)
    # The witness was shown another history of this origin meanwhile.
    witness.held["test.example/log"] = (11, b"\x01" * 32)
    write(log, 10, 10)
    cp.checkpoint()
    _wait(lambda: cp.alarms() == ["witness.test"])
    assert 422 in witness.answers
    assert metrics.witness_alarms() == ["witness.test"]
    assert any("witness alarm" in r.message and r.levelname == "ERROR" for r in caplog.records)
    close(log, cp)
    metrics.WITNESS_ALARM.labels("witness.test").set(0)


def test_an_unreachable_witness_does_not_stop_writing(
        tmp_path: Path, key: CheckpointKey, witness: TestWitness) -> None:
    path = tmp_path / "audit.log"
    cfg = config(witnesses=parse_tlog({"witnesses": [witness.config()]}).witnesses)
    witness.logs["test.example/log"] = key.verifier("test.example/log")
    witness.down = True
    log, cp = open_log(path, key, cfg)
    write(log, 10)
    assert cp.checkpoint() is not None
    assert cp.alarms() == []
    witness.down = False
    _wait(lambda: witness.held.get("test.example/log", (0,))[0] == 11, timeout=15)
    close(log, cp)


def test_witness_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="type 0x04"):
        parse_tlog({"witnesses": [{"name": "w", "url": "http://x/",
                                   "vkey": Verifier("w", 1, b"\x00" * 32).vkey()}]})
    with pytest.raises(ConfigError, match="checkpoint_interval"):
        parse_tlog({"checkpoint_interval": 0})


# -- the daemon: its checkpoint key on the token, publishing, refusals --------


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_daemon_signs_checkpoints_with_a_token_key_no_caller_can_use(
        daemon_factory: Any) -> None:
    import grpc

    from tests.conftest import rpc_error, unique_gun

    d = daemon_factory("tl", metrics=True)
    cp = started_checkpointer(d)
    assert cp.key is not None and d.servers.http is not None
    entry = next(k for t in d.servers.service.tokens.values() for k in t.keys()
                 if k.key_id == cp.key.key_id)
    assert entry.algorithm.name == "ed25519"
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        sig = c.sign(key.key_id, message=b"hello")
        assert sig.signature
        # The signature's audit line is in the log before the answer came back.
        audit_lines = (d.workdir / "audit.log").read_bytes().splitlines()
        assert any(b'"operation":"sign"' in line and key.key_id.encode() in line
                   for line in audit_lines)
        # The checkpoint key: unusable and invisible through every RPC.
        for call in (lambda: c.sign(cp.key.key_id, message=b"x"),
                     lambda: c.get_key(cp.key.key_id),
                     lambda: c.delete_key(cp.key.key_id)):
            assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
        assert cp.key.key_id not in {k.key_id for k in c.list_keys()}
    assert cp.checkpoint() is not None or cp.state.checkpoint.size > 0  # type: ignore[union-attr]
    port = d.servers.http.port
    status, body = _get(port, "/checkpoint")
    assert status == 200
    note = Note.parse(body)
    ckpt = Checkpoint.parse(note.text)
    vkey = (tree_dir(d.workdir / "audit.log") / "vkey").read_text().strip()
    assert note.verified_by(Verifier.from_vkey(vkey))

    def fetch(level: int, n: int, width: int) -> list[bytes]:
        code, data = _get(port, "/" + tile_path(level, n, width))
        if code != 200:
            raise KeyError((level, n, width))
        return split_hashes(data)

    # The tiles served verify with the primitives: they hash to the signed root.
    assert merkle.root(TileHashes(ckpt.size, fetch), ckpt.size) == ckpt.root
    assert _get(port, "/tile/entries/000")[0] == 404  # the lines stay private
    assert _get(port, "/" + tile_path(0, 0, min(255, ckpt.size + 1)))[0] == 404 \
        or ckpt.size >= 255


def test_the_daemon_refuses_to_start_on_a_rewritten_log(hsm: Any, certs: Any,
                                                        tmp_path: Path) -> None:
    from tests.conftest import daemon_config, start_daemon

    cfg = daemon_config(hsm, certs, tmp_path / "rw")
    d = start_daemon(cfg, certs, tmp_path / "rw")
    with d.client() as c:
        list(c.list_keys())
    d.stop()
    path = tmp_path / "rw" / "audit.log"
    _rewrite(path, all_lines(path)[:1])
    with pytest.raises(ConfigError, match="lines were removed; refusing to serve") as e:
        start_daemon(cfg, certs, tmp_path / "rw")
    assert "\n" not in str(e.value)


def _recorded_kid(record: Path) -> str:
    return str(json.loads(record.read_text())["kid"])


def _first_start(hsm: Any, certs: Any, work: Path,
                 algorithm: str = "") -> tuple[dict[str, Any], CheckpointKey, Any]:
    """A daemon's first start in ``work``, stopped: its config, its checkpoint key, and
    the KeyEntry of a caller's raw targets key made then (``algorithm``: the server's
    default if empty)."""
    from tests.conftest import daemon_config, start_daemon, unique_gun

    cfg = daemon_config(hsm, certs, work)
    d = start_daemon(cfg, certs, work)
    try:
        key = started_checkpointer(d).key
        assert key is not None
        with d.client() as c:
            other = c.create_key(unique_gun(), "targets", algorithm, purpose="raw")
        entry = next(k for t in d.servers.service.tokens.values() for k in t.keys()
                     if k.key_id == other.key_id)
        return cfg, key, entry
    finally:
        d.stop()


def _start_with_record(cfg: dict[str, Any], certs: Any, work: Path, record: str,
                       first: str) -> None:
    """Start in ``work`` with ``record`` as its .checkpoint-key: the log's key ``first``
    is the one used, and recorded again, whole."""
    from tests.conftest import start_daemon

    (work / ".checkpoint-key").write_text(record + "\n")
    d = start_daemon(cfg, certs, work)
    try:
        key = started_checkpointer(d).key
        assert key is not None and key.key_id == first, record[:80]
    finally:
        d.stop()
    assert _recorded_kid(work / ".checkpoint-key") == first, record[:80]


def test_the_checkpoint_key_is_found_again_by_its_recorded_id(hsm: Any, certs: Any,
                                                              tmp_path: Path) -> None:
    """A start finds the checkpoint key by the ID the audit directory recorded (one search,
    not a listing of every key: issue 24's 10,000-key start). The record is a hint: garbage,
    or the ID of a key that is not a checkpoint key, and the key is chosen as at a first
    start, the same one."""

    work = tmp_path / "rk"
    cfg, key, entry = _first_start(hsm, certs, work)
    first, other = key.key_id, entry.key_id
    record = work / ".checkpoint-key"
    assert _recorded_kid(record) == first
    deep = '{"kid": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for hint in (first, "not a key id", other, "ab" * 32, "{not json", '{"kid": 1}', deep):
        _start_with_record(cfg, certs, work, hint, first)


def test_a_recorded_checkpoint_key_needs_no_token_search_before_serving(
        hsm: Any, certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24: a daemon of 10,000 keys serves within 0.5 s of its module's C_Initialize,
    and one search of such a token takes about 1 s. So the record holds the whole key (ID,
    algorithm, token, public key), and a start builds the checkpoint key from it without
    asking the token; the key's entry is found in the background, and signs."""
    import base64

    from signerd.config import parse_config
    from signerd.keys import key_id, tuf_public_bytes
    from signerd.service import KeyService, checkpoint_key
    from signerd.token import Token
    work = tmp_path / "fast"
    cfg, first, _ = _first_start(hsm, certs, work)
    doc = json.loads((work / ".checkpoint-key").read_text())
    assert set(doc) == {"alg", "kid", "spki", "token"}
    spki = base64.b64decode(doc["spki"])
    assert doc["kid"] == first.key_id == key_id("ed25519", tuf_public_bytes("ed25519", spki))

    asked: list[str] = []
    for name in ("lookup", "refresh", "keys"):
        real = getattr(Token, name)

        def spy(self: Any, *a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                asked.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(Token, name, spy)
    config = parse_config(cfg, work)
    service = KeyService.open(config)
    try:
        key = checkpoint_key(service, config.audit_tlog, work / "audit.log")
        assert asked == []  # no lookup, listing or refresh on this thread
        assert (key.key_id, key.public_key, key.sig_type) == (
            first.key_id, first.public_key, first.sig_type)
        note = key.sign_note("checkpoint\n", "signerd.test/fast")
        assert note.verified_by(key.verifier("signerd.test/fast"))
        assert key.failure() is None
    finally:
        service.close()


def test_a_record_that_is_not_the_logs_key_is_a_hint_and_a_wrong_key_is_never_used(
        hsm: Any, certs: Any, tmp_path: Path) -> None:
    """The whole record stands in for the token only if its public key hashes to its ID
    and is the key the log's tree published (its vkey). Another key's record, with that
    key's own public key, is a hint as before: the log's key is chosen again. So is any
    record in a new audit directory (no tree to hold it to; an attack session's finding:
    such a record refused the first start, and left a head that refused every later one).
    A record whose token field names another configured token finds the key where it is."""
    import base64

    from tests.conftest import daemon_config, start_daemon

    work = tmp_path / "wr"
    cfg, key, other = _first_start(hsm, certs, work, "ed25519")
    first = key.key_id
    record = work / ".checkpoint-key"
    mine = json.loads(record.read_text())
    theirs = {**mine, "kid": other.key_id,
              "spki": base64.b64encode(other.spki_der).decode()}
    for doc in (theirs, {**mine, "kid": other.key_id}, {**mine, "spki": theirs["spki"]},
                {**mine, "alg": "ecdsa-p256"}, {**mine, "token": "nosuch"}):
        _start_with_record(cfg, certs, work, json.dumps(doc), first)
    fresh = tmp_path / "fresh"
    fresh_cfg = daemon_config(hsm, certs, fresh)
    fresh.mkdir(parents=True, exist_ok=True)
    (fresh / ".checkpoint-key").write_text(json.dumps(theirs) + "\n")
    for _ in range(2):  # and a second start reads what the first left
        d = start_daemon(fresh_cfg, certs, fresh)
        try:
            cp = started_checkpointer(d)
            assert cp.key is not None and cp.key.key_id != other.key_id
            chosen = next(k for t in d.servers.service.tokens.values() for k in t.keys()
                          if k.key_id == cp.key.key_id)
            assert chosen.role == "signerd/audit-checkpoint"
        finally:
            d.stop()
        assert _recorded_kid(fresh / ".checkpoint-key") == chosen.key_id
    # The record's token field naming another configured token: the key is found where
    # it is, and signs.
    home = mine["token"]
    elsewhere = next(t["name"] for t in cfg["tokens"] if t["name"] != home)
    record.write_text(json.dumps({**mine, "token": elsewhere}) + "\n")
    d = start_daemon(cfg, certs, work)
    try:
        cp = started_checkpointer(d)
        assert cp.key is not None and cp.key.key_id == first
        with d.client() as c:
            c.sign(other.key_id, message=b"a line to checkpoint")
        assert cp.checkpoint() is not None
        assert cp.key.failure() is None
    finally:
        d.stop()


# -- signerctl audit vkey / prove / verify --checkpoint -----------------------


def test_signerctl_prints_the_vkey_and_proofs_that_verify(
        tmp_path: Path, key: CheckpointKey, capsys: pytest.CaptureFixture[str]) -> None:
    from signerd.cli.signerctl import main

    path = _stopped_log(tmp_path, key, 300)
    assert main(["audit", "vkey", str(path)]) == 0
    vkey = capsys.readouterr().out.strip()
    assert main(["audit", "vkey", "--json", str(path)]) == 0  # --json, as every command
    assert json.loads(capsys.readouterr().out) == {"log": str(path), "vkey": vkey}
    verifier = Verifier.from_vkey(vkey)
    note = Note.parse((tree_dir(path) / "checkpoint").read_bytes())
    assert note.verified_by(verifier)
    ckpt = Checkpoint.parse(note.text)
    line = all_lines(path)[99]
    assert main(["audit", "prove", "--json", "--inclusion", "100", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["seq"], doc["leaf_index"]) == (100, 99)
    import base64

    proof = [base64.b64decode(h) for h in doc["proof"]]
    merkle.verify_inclusion(leaf_hash(line), 99, ckpt.size, proof, ckpt.root)
    assert main(["audit", "prove", "--json", "--consistency", "7", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    mem = MemoryHashes()
    for x in all_lines(path)[:7]:
        mem.append(leaf_hash(x))
    merkle.verify_consistency(7, ckpt.size, merkle.root(mem, 7), ckpt.root,
                              [base64.b64decode(h) for h in doc["proof"]])
    saved = tmp_path / "checkpoint.saved"
    saved.write_bytes((tree_dir(path) / "checkpoint").read_bytes())
    assert main(["audit", "verify", str(path), "--checkpoint", str(saved), "--vkey", vkey]) == 0
    assert "301 lines checked against its tree" in capsys.readouterr().out
    # --vkey also takes the file `audit vkey` printed into (a new user's first try).
    vkey_file = tmp_path / "vkey.txt"
    vkey_file.write_text(vkey + "\n")
    assert main(["audit", "verify", str(path), "--checkpoint", str(saved),
                 "--vkey", str(vkey_file)]) == 0
    assert "301 lines checked against its tree" in capsys.readouterr().out
    # A line outside the checkpoint is named as the line asked for, in one numbering.
    assert main(["audit", "prove", "--inclusion", "100000", str(path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("signerctl: no proof: line 100000 is not in the last checkpoint's "
                          "tree, which holds lines 1 to 301"), err
    # A line edited and the chain recomputed: the chain is fine, the tree is not.
    lines = all_lines(path)
    lines[5] = lines[5].replace(b'"allow"', b'"deny"')
    _rewrite(path, _rechain(lines))
    assert main(["audit", "verify", str(path), "--checkpoint", str(saved), "--vkey", vkey]) != 0
    err = capsys.readouterr().err
    assert "line seq 6 is not the line checkpoint" in err and err.count("\n") == 1


_WITNESS_VKEY_NAME = "witness.example"


@pytest.mark.parametrize(("audit", "message"), [
    ({"checkpoints": "yes"}, "audit.checkpoints must be true or false"),
    ({"checkpoint_interval": 0}, "checkpoint_interval must be a number of seconds"),
    ({"checkpoint_interval": float("nan")}, "checkpoint_interval must be a number of seconds"),
    ({"checkpoint_interval": True}, "checkpoint_interval must be a number of seconds"),
    ({"origin": "has space"}, "audit.origin must be a non-empty string"),
    ({"origin": "a+b"}, "audit.origin must be a non-empty string"),
    ({"checkpoint_token": ""}, "audit.checkpoint_token must be a non-empty string"),
    ({"checkpoint_key": "ab"}, "audit.checkpoint_key must be a key ID"),
    ({"checkpoint_algorithm": "rsa-2048"}, "audit.checkpoint_algorithm must be one of"),
    ({"reset": "x" * 64}, "audit.reset must be the 64 hex digits"),
    ({"witnesses": {"name": "w"}}, "audit.witnesses must be [[audit.witnesses]] tables"),
    ({"witnesses": ["w"]}, "audit.witnesses[0] must be a table"),
    ({"witnesses": [{"name": "w", "url": "https://w/", "vkey": "k", "x": 1}]},
     "unknown keys in audit.witnesses[0]"),
    ({"witnesses": [{"name": "w", "url": "https://w/"}]}, "needs name, url and vkey"),
    ({"witnesses": [{"name": "w", "url": "ftp://w/", "vkey": "k"}]},
     "url must be an http:// or https:// URL"),
    ({"witnesses": [{"name": "w", "url": "https://w/", "vkey": "k"}]}, "audit.witnesses[0].vkey"),
])
def test_audit_transparency_settings_are_refused_with_their_name(
        audit: dict[str, Any], message: str) -> None:
    from signerd.audit._tlogconfig import parse_tlog

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_tlog(dict(audit))


def test_a_witness_key_must_be_a_cosignature_key_of_its_name() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from signerd.audit._tlogconfig import parse_tlog
    from signerd.tlog.note import COSIGNATURE_V1, ED25519, Verifier

    public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw,
                                                                    PublicFormat.Raw)
    good = Verifier(_WITNESS_VKEY_NAME, COSIGNATURE_V1, public).vkey()
    parsed = parse_tlog({"witnesses": [{"name": _WITNESS_VKEY_NAME, "url": "https://w",
                                        "vkey": good}]})
    assert parsed.witnesses[0].url == "https://w/" and not parsed.explicit
    for vkey in (Verifier(_WITNESS_VKEY_NAME, ED25519, public).vkey(),  # a log's key
                 Verifier("other.example", COSIGNATURE_V1, public).vkey()):
        with pytest.raises(ConfigError, match="must be a cosignature"):
            parse_tlog({"witnesses": [{"name": _WITNESS_VKEY_NAME, "url": "https://w",
                                       "vkey": vkey}]})
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_tlog({"witnesses": [{"name": _WITNESS_VKEY_NAME, "url": "https://w",
                                   "vkey": good}] * 2})
    assert parse_tlog({"checkpoints": True}).explicit
    # Naming the key's algorithm asks for checkpoints as much as checkpoints = true.
    named = parse_tlog({"checkpoint_algorithm": "ecdsa-p256"})
    assert named.explicit and named.algorithm == "ecdsa-p256"


def test_two_workers_publish_each_tree_under_its_own_prefix(hsm: Any, certs: Any,
                                                             tmp_path: Path) -> None:
    """With ``workers = 2`` each worker's log is a tree of its own (its own origin); the
    supervisor, which holds the metrics listener, serves worker i's checkpoint and tiles
    at /w<i>/ (issue 25 §3), verified here by each log's vkey and the tiles' root."""
    from tests.conftest import daemon_config, spawn_daemon, unique_gun, write_toml
    from tests.test_audit_rotation import _client

    data = daemon_config(hsm, certs, tmp_path, server={"workers": 2}, metrics=True)
    data["audit"]["checkpoint_interval"] = 0.2
    proc = spawn_daemon(write_toml(tmp_path / "signerd.toml", data), tmp_path)
    try:
        with _client(certs, proc.info["tcp"]) as c:
            key = c.create_key(unique_gun(), "targets", purpose="raw").key_id
            for i in range(40):  # new connections: SO_REUSEPORT spreads them
                with _client(certs, proc.info["tcp"]) as one:
                    one.sign(key, message=b"m%d" % i)
        port = proc.info["metrics"]
        origins = set()
        for i in (1, 2):
            vkey = (tree_dir(tmp_path / f"audit.log.w{i}") / "vkey").read_text().strip()
            _wait(lambda i=i: _get(port, f"/w{i}/checkpoint")[0] == 200)
            status, body = _get(port, f"/w{i}/checkpoint")
            note = Note.parse(body)
            assert note.verified_by(Verifier.from_vkey(vkey))
            ckpt = Checkpoint.parse(note.text)
            origins.add(ckpt.origin)

            def fetch(level: int, n: int, width: int, i: int = i) -> list[bytes]:
                code, data = _get(port, f"/w{i}/" + tile_path(level, n, width))
                if code != 200:
                    raise KeyError((level, n, width))
                return split_hashes(data)

            assert merkle.root(TileHashes(ckpt.size, fetch), ckpt.size) == ckpt.root
            assert _get(port, f"/w{i}/tile/entries/000")[0] == 404
        assert len(origins) == 2
        assert _get(port, "/w3/checkpoint")[0] == 404
        assert _get(port, "/checkpoint")[0] == 404  # no tree is "the" daemon's
        assert _get(port, "/metrics")[0] == 200
    finally:
        assert proc.stop() == 0
