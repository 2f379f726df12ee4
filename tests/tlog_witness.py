"""A test witness implementing c2sp.org/tlog-witness (add-checkpoint) over
real HTTP on loopback. It verifies every request as the spec asks before it
cosigns: the log's signature on the checkpoint (else 403), a known origin
(else 404), the old size against the size it holds (else 409 with
``text/x.tlog.size``), and the consistency proof from its checkpoint to the
new one (else 422); then it cosigns (c2sp.org/tlog-cosignature, type 0x04)."""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd.tlog import merkle
from signerd.tlog.merkle import EMPTY_ROOT
from signerd.tlog.note import COSIGNATURE_V1, Checkpoint, Note, NoteError, Verifier, cosign


class TestWitness:
    """``logs``: origin -> the log's Verifier. ``held``: origin -> (size, root)."""

    __test__ = False

    def __init__(self, name: str = "witness.test") -> None:
        self.name = name
        self._key = Ed25519PrivateKey.generate()
        pub = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = Verifier(name, COSIGNATURE_V1, pub)
        self.logs: dict[str, Verifier] = {}
        self.held: dict[str, tuple[int, bytes]] = {}
        self.answers: list[int] = []
        self.down = False
        self._lock = threading.Lock()
        witness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if witness.down or self.path != "/add-checkpoint":
                    code, data, ctype = (503 if witness.down else 404), b"", "text/plain"
                else:
                    code, data, ctype = witness.add_checkpoint(body)
                witness.answers.append(code)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def vkey(self) -> str:
        return self.verifier.vkey()

    def config(self) -> dict[str, str]:
        return {"name": self.name, "url": self.url, "vkey": self.vkey()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_checkpoint(self, body: bytes) -> tuple[int, bytes, str]:
        head, sep, note_bytes = body.partition(b"\n\n")
        if not sep:
            return 400, b"no blank line\n", "text/plain"
        lines = head.decode().split("\n")
        if not lines[0].startswith("old ") or not lines[0][4:].isdigit():
            return 400, b"bad old line\n", "text/plain"
        old = int(lines[0][4:])
        try:
            proof = [base64.b64decode(x, validate=True) for x in lines[1:]]
            note = Note.parse(note_bytes)
            cp = Checkpoint.parse(note.text)
        except (ValueError, NoteError):
            return 400, b"malformed\n", "text/plain"
        log = self.logs.get(cp.origin)
        if log is None:
            return 404, b"unknown log\n", "text/plain"
        try:
            if not note.verified_by(log):
                return 403, b"not signed by the log\n", "text/plain"
        except NoteError:
            return 403, b"bad signature\n", "text/plain"
        with self._lock:
            size, root = self.held.get(cp.origin, (0, EMPTY_ROOT))
            if old != size:
                return 409, f"{size}\n".encode(), "text/x.tlog.size"
            if old > cp.size:
                return 400, b"old size larger than the checkpoint\n", "text/plain"
            try:
                if old == 0:
                    if proof:
                        raise merkle.ProofError("a proof from the empty tree")
                else:
                    merkle.verify_consistency(old, cp.size, root, cp.root, proof)
            except merkle.ProofError:
                return 422, b"consistency proof does not verify\n", "text/plain"
            self.held[cp.origin] = (cp.size, cp.root)
        sig = cosign(note.text, self.name, self.verifier.public_key, int(time.time()),
                     lambda m: self._key.sign(m))
        return 200, sig.line().encode(), "text/plain"
