"""Pushing checkpoints to witnesses (c2sp.org/tlog-witness,
c2sp.org/tlog-cosignature): one thread per witness sends the newest
checkpoint with ``POST <url>add-checkpoint``::

    old <size the witness holds>
    <consistency proof, one base64 hash a line>

    <signed checkpoint>

and acts on the answer as the spec says: 200 carries cosignature lines
(each verified with the witness's vkey before it is kept); 409 (Content-Type
``text/x.tlog.size``) names the size the witness holds, and the request is
sent again with a proof from it; 422 (the witness refused the proof) and 403
or 404 (it does not know this log or its key) raise the alarm: an error log
line, ``signerd_audit_witness_alarm``, and /readyz not ready. A witness that
cannot be reached is retried with backoff (1 s doubling to 60 s) and counted
in ``signerd_audit_witness_failures_total``; signing goes on.

A witness that holds a larger tree than this log has is an alarm too: lines
were removed. At start (:meth:`WitnessPusher.check_at_start`) both are
refusals to serve.

The standard library's urllib is enough for one POST at a time and keeps
the daemon's dependencies as they are.
"""

from __future__ import annotations

import base64
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final

from signerd.audit._tlogconfig import WitnessConfig
from signerd.audit._tree import AuditTree
from signerd.tlog import merkle
from signerd.tlog.note import (
    Checkpoint,
    Note,
    NoteError,
    Verifier,
    verify_cosignature,
)

log = logging.getLogger("signerd.audit")
_TIMEOUT: Final = 10.0  # seconds per request
_BACKOFF: Final = (1.0, 60.0)  # first and longest wait after a failure, seconds
_MAX_BODY: Final = 64 * 1024


class _Answer:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body, self.content_type = status, body, content_type


class WitnessPusher:
    """Keeps one witness up to date with the log's checkpoints."""

    def __init__(self, config: WitnessConfig, log_verifier: Verifier, tree: AuditTree,
                 metrics: Any, cosigned: Callable[[Checkpoint, list[str]], None]) -> None:
        self.config = config
        self._log_verifier = log_verifier
        self._tree = tree
        self._metrics = metrics
        self._cosigned = cosigned
        self.known: int | None = None  # the size the witness holds, once known
        self.alarm: str | None = None
        self._pending: tuple[Note, Checkpoint] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, note: Note, cp: Checkpoint) -> None:
        """Send this checkpoint next (a newer one replaces one not yet sent)."""
        self._pending = (note, cp)
        self._wake.set()

    def start(self) -> None:
        """Start the pushing thread."""
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"witness-{self.config.name}")
        self._thread.start()

    def stop(self) -> None:
        """Stop pushing (a request in flight finishes or times out)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(_TIMEOUT + 1)

    def check_at_start(self, note: Note, cp: Checkpoint) -> str | None:
        """Push the start's checkpoint once; why the start must be refused
        (the witness holds more, or refuses the proof), else None. An
        unreachable witness does not stop a start: it is retried later."""
        outcome = self._push(note, cp)
        if outcome == "refused":
            return self.alarm
        return None

    def _run(self) -> None:
        wait = _BACKOFF[0]
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            pending = self._pending
            if pending is None or self._stop.is_set():
                continue
            outcome = self._push(*pending)
            if outcome == "unreachable":
                self._stop.wait(wait)
                wait = min(wait * 2, _BACKOFF[1])
                self._wake.set()
            else:
                wait = _BACKOFF[0]
                if self._pending is pending:
                    self._pending = None

    def _push(self, note: Note, cp: Checkpoint) -> str:
        """One add-checkpoint exchange (with a second try after a 409):
        "cosigned", "refused" (alarm raised) or "unreachable"."""
        for _ in range(3):
            old = self.known if self.known is not None else 0
            if old > cp.size:
                return self._refuse(f"witness {self.config.name} holds size {old} of "
                                    f"{cp.origin}, but this log's tree has only {cp.size} "
                                    "lines: lines were removed", "larger")
            try:
                proof = (merkle.consistency_proof(self._tree.hashes(cp.size), old, cp.size)
                         if 0 < old < cp.size else [])
            except (KeyError, merkle.ProofError) as e:
                return self._refuse(f"cannot prove size {cp.size} from the witness's "
                                    f"{old}: {e}", "proof")
            body = (f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n"
                                             for h in proof) + "\n").encode() + note.to_bytes()
            answer = self._post(body)
            if answer is None:
                return "unreachable"
            if answer.status == 200:
                return self._accept(answer.body, cp)
            if answer.status == 409 and answer.content_type.startswith("text/x.tlog.size"):
                size = answer.body.decode("ascii", "replace").strip()
                if not size.isdigit():
                    return self._fail("a 409 without a size")
                self.known = int(size)
                continue
            if answer.status == 422:
                return self._refuse(f"witness {self.config.name} refused the consistency proof "
                                    f"from size {old} to {cp.size} of {cp.origin}", "proof")
            if answer.status in (403, 404):
                return self._refuse(f"witness {self.config.name} does not accept {cp.origin} "
                                    f"or its key (HTTP {answer.status}): configure it there "
                                    f"with the vkey {self._log_verifier.vkey()}", "unknown")
            return self._fail(f"HTTP {answer.status}")
        return self._fail("the witness's size kept changing")

    def _post(self, body: bytes) -> _Answer | None:
        # The URL's scheme is http(s), checked when the config was read.
        request = urllib.request.Request(self.config.url + "add-checkpoint", data=body,  # noqa: S310
                                         method="POST",
                                         headers={"Content-Type": "text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as resp:  # noqa: S310
                return _Answer(resp.status, resp.read(_MAX_BODY),
                               resp.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as e:
            return _Answer(e.code, e.read(_MAX_BODY), e.headers.get("Content-Type", ""))
        except (OSError, ValueError) as e:
            self._count("unreachable")
            log.warning("witness unreachable; retrying", extra={"fields": {
                "witness": self.config.name, "error": str(e)}})
            return None

    def _accept(self, body: bytes, cp: Checkpoint) -> str:
        lines = []
        try:
            for line in body.decode("utf-8").splitlines():
                sig = Note.parse(f"{cp.text()}\n{line}\n".encode()).signatures[0]
                verify_cosignature(cp.text(), sig, self.config.verifier)
                lines.append(sig.line())
        except (UnicodeDecodeError, NoteError) as e:
            return self._refuse(f"witness {self.config.name} answered with a cosignature that "
                                f"does not verify: {e}", "cosignature")
        if not lines:
            return self._fail("no cosignature in a 200 answer")
        self.known = cp.size
        if self.alarm is not None:
            log.warning("witness cosigns again", extra={"fields": {"witness": self.config.name}})
        self.alarm = None
        if self._metrics is not None:
            self._metrics.child(self._metrics.WITNESS_ALARM, self.config.name).set(0)
            self._metrics.child(self._metrics.WITNESS_SIZE, self.config.name).set(cp.size)
        self._cosigned(cp, lines)
        return "cosigned"

    def _refuse(self, why: str, reason: str) -> str:
        self.alarm = why
        self._count(reason)
        if self._metrics is not None:
            self._metrics.child(self._metrics.WITNESS_ALARM, self.config.name).set(1)
        log.error("audit witness alarm: " + why, extra={"fields": {"witness": self.config.name}})
        return "refused"

    def _fail(self, why: str) -> str:
        self._count("error")
        log.warning("witness answered unexpectedly; retrying", extra={"fields": {
            "witness": self.config.name, "error": why}})
        return "unreachable"

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.WITNESS_FAILURES, self.config.name, reason).inc()
