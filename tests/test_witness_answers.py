"""What the audit log's witness pusher makes of each answer a witness can
give (c2sp.org/tlog-witness), from a scripted witness over real HTTP on
loopback: a garbage 200 or 409 is retried and never taken as a
cosignature, a witness that holds more than the log or cannot be shown a
proof raises the alarm (and refuses a start), and a witness that cosigns
again clears it. tests/test_audit_tlog.py runs the pusher against a witness
that verifies everything."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd.audit._tlogconfig import WitnessConfig
from signerd.audit._tree import AuditTree
from signerd.audit._witness import WitnessPusher
from signerd.tlog.merkle import EMPTY_ROOT
from signerd.tlog.note import (
    COSIGNATURE_V1,
    ED25519,
    Checkpoint,
    Verifier,
    cosign,
    sign_note,
)

ORIGIN = "test.example/log"
Answer = tuple[int, str, bytes]  # status, Content-Type, body


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class ScriptedWitness:
    """Answers each add-checkpoint with the next of ``script`` (the last one
    again when it runs out) and keeps the request bodies."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.bodies: list[bytes] = []
        self.key = Ed25519PrivateKey.generate()
        self.verifier = Verifier("witness.test", COSIGNATURE_V1, _raw(self.key))
        witness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                witness.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status, ctype, body = (witness.script.pop(0) if len(witness.script) > 1
                                       else witness.script[0])
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def cosignature(self, cp: Checkpoint) -> bytes:
        return cosign(cp.text(), self.verifier.name, self.verifier.public_key,
                      int(time.time()), self.key.sign).line().encode()


class Pushing:
    """A pusher for one log key and (empty) tree, toward ``url``."""

    def __init__(self, tmp: Path, witness: ScriptedWitness, url: str | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.log_verifier = Verifier(ORIGIN, ED25519, _raw(self.key))
        self.cosigned: list[tuple[int, list[str]]] = []
        self.pusher = WitnessPusher(
            WitnessConfig("witness.test", url or witness.url, witness.verifier),
            self.log_verifier, AuditTree(tmp / "tree", 0), None,
            lambda cp, lines: self.cosigned.append((cp.size, lines)))

    def push(self, size: int) -> tuple[str | None, Checkpoint]:
        """check_at_start with a signed checkpoint of ``size``: its refusal, or None."""
        cp = Checkpoint(ORIGIN, size, EMPTY_ROOT)
        note = sign_note(cp.text(), ORIGIN, self.log_verifier.public_key, self.key.sign)
        return self.pusher.check_at_start(note, cp), cp


@pytest.fixture
def witness() -> Iterator[ScriptedWitness]:
    w = ScriptedWitness()
    yield w
    w.server.shutdown()
    w.server.server_close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(r.__dict__.get("fields", {}).get("error")) for r in caplog.records
            if r.levelname == "WARNING" and r.name == "signerd.audit"]


@pytest.mark.parametrize(("script", "why"), [
    ([(200, "text/plain", b"")], "no cosignature in a 200 answer"),
    ([(409, "text/x.tlog.size", b"many\n")], "a 409 without a size"),
    ([(409, "text/x.tlog.size", b"0\n")], "the witness's size kept changing"),
    ([(500, "text/plain", b"oops")], "HTTP 500"),
    ([(409, "text/plain", b"0\n")], "HTTP 409"),  # a 409 that is not a size is no answer
])
def test_an_answer_that_means_nothing_is_retried_without_an_alarm(
        tmp_path: Path, witness: ScriptedWitness, caplog: pytest.LogCaptureFixture,
        script: list[Answer], why: str) -> None:
    witness.script = script
    p = Pushing(tmp_path, witness)
    with caplog.at_level(logging.WARNING, logger="signerd.audit"):
        refused, _ = p.push(5)
    assert refused is None and p.pusher.alarm is None
    assert p.cosigned == [] and p.pusher.known in (None, 0)
    assert _warnings(caplog) == [why]


def test_a_cosignature_that_does_not_verify_raises_the_alarm(
        tmp_path: Path, witness: ScriptedWitness) -> None:
    p = Pushing(tmp_path, witness)
    cp = Checkpoint(ORIGIN, 5, EMPTY_ROOT)
    other = Checkpoint(ORIGIN, 6, EMPTY_ROOT)  # cosigned, but not the checkpoint sent
    for body in (b"\xff\xfe", b"not a signature line", witness.cosignature(other)):
        witness.script = [(200, "text/plain", body)]
        refused, _ = p.push(5)
        assert refused is not None and refused.startswith(
            "witness witness.test answered with a cosignature that does not verify: "), body
        assert p.pusher.alarm == refused and p.cosigned == []
    # The witness cosigns the checkpoint sent: the alarm is over, the cosignature kept.
    good = witness.cosignature(cp)
    witness.script = [(200, "text/plain", good)]
    assert p.push(5)[0] is None
    assert p.pusher.alarm is None and p.pusher.known == 5
    assert p.cosigned == [(5, [good.decode()])]


def test_a_witness_that_holds_a_larger_tree_refuses_the_start(
        tmp_path: Path, witness: ScriptedWitness) -> None:
    witness.script = [(409, "text/x.tlog.size", b"9\n")]
    p = Pushing(tmp_path, witness)
    refused, _ = p.push(5)
    assert refused == (f"witness witness.test holds size 9 of {ORIGIN}, but this log's tree "
                       "has only 5 lines: lines were removed")
    assert p.pusher.known == 9 and len(witness.bodies) == 1
    assert witness.bodies[0].startswith(b"old 0\n\n")


def test_a_size_the_tree_cannot_prove_from_refuses_the_start(
        tmp_path: Path, witness: ScriptedWitness) -> None:
    """The witness holds 3 of this origin, but this log's tree (empty here:
    its files were lost) has nothing to prove 5 from."""
    witness.script = [(409, "text/x.tlog.size", b"3\n")]
    p = Pushing(tmp_path, witness)
    refused, _ = p.push(5)
    assert refused is not None and refused.startswith(
        "cannot prove size 5 from the witness's 3: "), refused


@pytest.mark.parametrize("status", [403, 404])
def test_a_witness_that_does_not_know_the_log_names_its_vkey(
        tmp_path: Path, witness: ScriptedWitness, status: int) -> None:
    witness.script = [(status, "text/plain", b"unknown log\n")]
    p = Pushing(tmp_path, witness)
    refused, _ = p.push(5)
    assert refused == (f"witness witness.test does not accept {ORIGIN} or its key (HTTP "
                       f"{status}): configure it there with the vkey {p.log_verifier.vkey()}")


def test_a_witness_nobody_answers_for_is_retried_in_the_background(
        tmp_path: Path, witness: ScriptedWitness, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = Pushing(tmp_path, witness, url=f"http://127.0.0.1:{port}/")
    with caplog.at_level(logging.WARNING, logger="signerd.audit"):
        assert p.push(5)[0] is None  # does not stop a start
        cp = Checkpoint(ORIGIN, 5, EMPTY_ROOT)
        note = sign_note(cp.text(), ORIGIN, p.log_verifier.public_key, p.key.sign)
        p.pusher.start()
        p.pusher.submit(note, cp)
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        p.pusher.stop()  # wakes the backoff at once
    assert time.monotonic() - started < 1
    assert [r.getMessage() for r in caplog.records][:2] == ["witness unreachable; retrying"] * 2
    assert "Connection refused" in _warnings(caplog)[0]
    assert p.pusher.alarm is None
