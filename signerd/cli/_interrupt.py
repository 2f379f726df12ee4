"""Ctrl-C while signerctl creates keys: finish first, so that no key is left unnamed.

Regression (issue 21 §4): Ctrl-C during ``keys create --algorithm rsa-4096``
printed ``interrupted`` (exit 130), but signerd went on generating the key
and kept it, and its ID was never shown. A CreateKey that has reached the
daemon cannot be taken back: the token generates the key whether or not the
client is still waiting.

So a command that creates keys (``keys create``, ``trust init``, ``trust
rotate``) runs under :class:`FinishFirst`. The first Ctrl-C does not cut it
short: signerctl says so on stderr, lets the command run to its end (the
wait is for the token), prints its result as usual, with every key ID it
made, and then exits 130. A second Ctrl-C abandons the wait (exit 130), and
signerctl says that a key may exist all the same and how to list it. (A
failure that is not a Ctrl-C destroys the keys a trust workflow made:
signerd.trust.workflows.undone_on_failure.)

Signal handlers run on the main thread between bytecodes; gRPC's blocking
calls wait in short slices and let them run, so the handler below is called
while a call is in flight, and the call goes on when it returns.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

FIRST = ("signerctl: Ctrl-C: finishing first, so that no key is left without its ID "
         "(Ctrl-C again to abandon)")


class FinishFirst:
    """Defer the first SIGINT for the ``with`` block; ``interrupted`` says
    whether one came. A second SIGINT raises KeyboardInterrupt. Off the main
    thread (signal handlers cannot be set there) it changes nothing."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: object = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print(FIRST, file=sys.stderr, flush=True)

    def __enter__(self) -> FinishFirst:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False


def finished_line() -> str:
    """What signerctl says after a command it finished despite a Ctrl-C."""
    return ("signerctl: interrupted: finished first; the key(s) shown above exist (delete an "
            "unwanted one with 'signerctl keys delete KEYID')")


def abandoned_line(gun: str | None, role: str | None) -> str:
    """What signerctl says when a second Ctrl-C abandoned a key creation."""
    where = " ".join(f"--{k} {v}" for k, v in (("gun", gun), ("role", role)) if v)
    listing = f"signerctl keys list {where}".rstrip()
    return ("signerctl: interrupted before signerd answered: a key being created may exist "
            f"all the same; '{listing}' shows it (USED no)")
