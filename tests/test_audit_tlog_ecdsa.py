"""Audit checkpoints signed with ECDSA P-256 (signed-note type 0x02, issue 25
§2), for tokens that make no Ed25519 key: a daemon on a real SoftHSM token
told to use ECDSA, its /checkpoint held to a verifier written from the spec
(tests/_note_check.py, nothing of signerd's), ``signerctl audit vkey``, the
start check, a witness that verifies every push, and mutated notes refused;
Yubico's module on the software YubiHSM 2 told to use ECDSA. The TPM, which
cannot make Ed25519 keys at all and so gets ECDSA by default, is in
test_tokens.py."""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from signerd.audit import tree_dir
from signerd.config import TokenConfig
from signerd.errors import ConfigError
from signerd.service import CHECKPOINT_ROLE
from signerd.tlog.note import ECDSA_SHA256, Checkpoint, Note, NoteError, Verifier, cosignatures
from tests._note_check import Refused, open_ecdsa_note, parse_ecdsa_vkey
from tests.conftest import (
    HSM,
    PKI,
    TOKENS,
    daemon_config,
    hsm_token,
    rpc_error,
    start_daemon,
    started_checkpointer,
    unique_gun,
)
from tests.tlog_witness import TestWitness

ORIGIN = "ecdsa.test/signerd/audit"


def remove_ecdsa_checkpoint_keys(config: TokenConfig) -> None:
    """Destroy the ECDSA checkpoint keys on a token a test session shares: a
    daemon uses a checkpoint key it finds before it makes one, so a key left
    behind would become the checkpoint key of every later test's daemon there."""
    from signerd.token import Token

    token = Token(config)
    try:
        token.refresh()
        for k in token.keys():
            if k.role == CHECKPOINT_ROLE and k.algorithm.name == "ecdsa-p256":
                token.delete(k.key_id)
    finally:
        token.close()


@pytest.fixture
def ecdsa_key_removed(hsm: HSM) -> Iterator[None]:
    """:func:`remove_ecdsa_checkpoint_keys` of the session's SoftHSM tokens, after."""
    yield
    for name in TOKENS:
        remove_ecdsa_checkpoint_keys(hsm_token(hsm, name))


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(cond: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _vkey(log: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from signerd.cli.signerctl import main

    assert main(["audit", "vkey", str(log)]) == 0
    return capsys.readouterr().out.strip()


def _mutated(note: bytes, at: int) -> bytes:
    """``note`` with byte ``at`` of its (first) signature's decoded blob flipped."""
    text, _, lines = note.decode().rpartition("\n\n")
    first, *rest = lines.splitlines()
    head, b64 = first.rsplit(" ", 1)
    blob = bytearray(base64.b64decode(b64))
    blob[at] ^= 0x01
    line = f"{head} {base64.b64encode(bytes(blob)).decode()}"
    return (text + "\n\n" + "\n".join([line, *rest]) + "\n").encode()


def test_a_daemon_told_to_use_ecdsa_signs_checkpoints_a_spec_verifier_accepts(
        hsm: HSM, certs: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        ecdsa_key_removed: None) -> None:
    work = tmp_path / "ec"
    log = work / "audit.log"
    cfg = daemon_config(hsm, certs, work, metrics=True)
    cfg["audit"].update(checkpoint_algorithm="ecdsa-p256", origin=ORIGIN)
    d = start_daemon(cfg, certs, work)
    try:
        cp = started_checkpointer(d)
        assert cp is not None and d.servers.http is not None
        assert cp.key.sig_type == ECDSA_SHA256
        entry = next(k for t in d.servers.service.tokens.values() for k in t.keys()
                     if k.key_id == cp.key.key_id)
        assert entry.algorithm.name == "ecdsa-p256" and entry.role == CHECKPOINT_ROLE
        with d.client() as c:
            key = c.create_key(unique_gun(), "targets", purpose="raw")
            assert c.sign(key.key_id, message=b"hello").signature
            # The checkpoint key signs through no RPC.
            err = rpc_error(lambda: c.sign(cp.key.key_id, message=b"x"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        assert cp.checkpoint() is not None
        status, body = _get(d.servers.http.port, "/checkpoint")
        assert status == 200
    finally:
        d.stop()
    vkey = _vkey(log, capsys)
    # The vkey names the token's key: type 0x02 and its SPKI, ID = SHA-256(SPKI)[:4].
    name, _, _, spki = parse_ecdsa_vkey(vkey)
    token_spki = load_der_public_key(entry.spki_der).public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert name == ORIGIN and spki == token_spki
    text = open_ecdsa_note(body, vkey)  # the spec's verifier, not signerd's
    ckpt = Checkpoint.parse(text)
    assert ckpt.origin == ORIGIN and ckpt.size >= 3
    assert Note.parse(body).verified_by(Verifier.from_vkey(vkey))

    # Mutated: a signature byte (refused), the key ID (no signature by the key).
    bad_sig, bad_kid = _mutated(body, 20), _mutated(body, 0)
    for bad, why in ((bad_sig, "does not verify"), (bad_kid, "no signature by")):
        with pytest.raises(Refused, match=why):
            open_ecdsa_note(bad, vkey)
    with pytest.raises(NoteError, match="does not verify"):
        Note.parse(bad_sig).verified_by(Verifier.from_vkey(vkey))
    assert not Note.parse(bad_kid).verified_by(Verifier.from_vkey(vkey))

    # A restart checks the log against its ECDSA checkpoint, then pushes it to a
    # witness that verifies the log's signature (type 0x02) and every proof.
    witness = TestWitness()
    try:
        witness.logs[ORIGIN] = Verifier.from_vkey(vkey)
        for bad in (bad_sig, bad_kid):
            assert witness.add_checkpoint(b"old 0\n\n" + bad)[0] == 403
        cfg["audit"]["witnesses"] = [witness.config()]
        d = start_daemon(cfg, certs, work)
        try:
            cp = started_checkpointer(d)
            assert cp is not None and d.servers.http is not None
            with d.client() as c:
                list(c.list_keys())
            latest = cp.checkpoint()
            assert latest is not None and latest.size > ckpt.size
            _wait(lambda: witness.held.get(ORIGIN, (0,))[0] == latest.size)
            assert 200 in witness.answers and not cp.alarms()
            port = d.servers.http.port

            def served() -> Note:
                return Note.parse(_get(port, "/checkpoint")[1])

            _wait(lambda: len(served().signatures) == 2)  # the cosignature, served
            note = served()
            assert cosignatures(note, [witness.verifier]) == {
                witness.name: pytest.approx(time.time(), abs=60)}
            assert open_ecdsa_note(note.to_bytes(), vkey) == latest.text()
        finally:
            d.stop()
    finally:
        witness.close()
    saved = tmp_path / "checkpoint.saved"
    saved.write_bytes((tree_dir(log) / "checkpoint").read_bytes())
    from signerd.cli.signerctl import main

    assert main(["audit", "verify", str(log), "--checkpoint", str(saved), "--vkey", vkey]) == 0
    capsys.readouterr()

    # The checkpoint on disk with its signature mutated: the next start refuses.
    (tree_dir(log) / "checkpoint").write_bytes(_mutated(saved.read_bytes(), 20))
    cfg["audit"].pop("witnesses")
    with pytest.raises(ConfigError, match="does not verify; refusing to serve") as e:
        start_daemon(cfg, certs, work)
    assert "\n" not in str(e.value)


def test_a_named_checkpoint_key_of_another_algorithm_is_refused(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """An Ed25519 checkpoint key named while ``checkpoint_algorithm`` asks for
    ECDSA: the start is refused naming both, rather than one silently winning."""
    work = tmp_path / "named"
    first = daemon_config(hsm, certs, work)
    first["audit"]["checkpoint_algorithm"] = "ed25519"
    d = start_daemon(first, certs, work)
    try:
        cp = started_checkpointer(d)
        assert cp is not None and cp.key.sig_type == 0x01
        kid = cp.key.key_id
    finally:
        d.stop()
    cfg = daemon_config(hsm, certs, tmp_path / "named2")
    cfg["audit"].update(checkpoint_key=kid, checkpoint_algorithm="ecdsa-p256")
    with pytest.raises(ConfigError, match=f"checkpoint_key {kid} is an ed25519 key, not the "
                                          "audit.checkpoint_algorithm ecdsa-p256"):
        start_daemon(cfg, certs, tmp_path / "named2")


def test_a_yubihsm_told_to_use_ecdsa_signs_checkpoints_a_spec_verifier_accepts(
        yubihsm: Any, certs: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Yubico's own module (software YubiHSM 2, tests/_yubihsm): it makes Ed25519
    keys, so it gets an Ed25519 checkpoint key by default; told ECDSA, its
    CKM_ECDSA r || s becomes a type 0x02 note the spec's verifier accepts."""
    from tests.conftest import yubihsm_token
    from tests.test_tokens import _yubihsm2_kind, daemon_config_for

    work = tmp_path / "yubi"
    cfg = daemon_config_for(_yubihsm2_kind(yubihsm), certs, work)
    cfg["audit"]["checkpoint_algorithm"] = "ecdsa-p256"
    d = start_daemon(cfg, certs, work)
    try:
        cp = started_checkpointer(d)
        assert cp is not None and cp.key.sig_type == ECDSA_SHA256
        assert d.servers.http is not None
        with d.client() as c:
            list(c.list_keys())
        assert cp.checkpoint() is not None
        status, body = _get(d.servers.http.port, "/checkpoint")
        assert status == 200
    finally:
        d.stop()
        remove_ecdsa_checkpoint_keys(yubihsm_token(yubihsm))
    vkey = _vkey(work / "audit.log", capsys)
    assert Checkpoint.parse(open_ecdsa_note(body, vkey)).size == cp.state.checkpoint.size
