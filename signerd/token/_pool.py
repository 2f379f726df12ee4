"""The session pool of one token: sessions borrowed for one operation and
given back, kept alive on devices that close idle sessions, and sized within
the device's session budget."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11

from signerd.errors import ConfigError, Unavailable
from signerd.token import _p11
from signerd.token._locks import _ObjectLocks
from signerd.token.profiles import Profile

log = logging.getLogger("signerd.token")

_POOL_WAIT = 30.0  # seconds a request waits for a free session before UNAVAILABLE
_GIVE_UP_EVERY = 0.1  # seconds: how often a waiting borrower looks for give_up()
_KEEPALIVE_LABEL = b"signerd-keepalive"  # searched for, never created


def check_budget(name: str, profile: Profile, sessions: int, processes: int) -> None:
    """Raise ConfigError when ``sessions`` per pool × ``processes`` worker
    processes exceed what ``profile``'s device allows in all (its
    ``max_sessions``; the YubiHSM 2 allows 16)."""
    limit = profile.max_sessions
    if limit is not None and sessions * processes > limit:
        raise ConfigError(
            f"token {name} ({profile.name}) allows {limit} sessions in all, but "
            f"its pool needs {sessions} × {processes} worker "
            "process(es); lower its sessions or server.workers"
        )


class SessionPool:
    """The logged-in sessions of one token, each used by one thread at a time.

    A session is borrowed with :meth:`borrow` as ``(generation, session)``;
    one borrowed before the pool was refilled (an older generation) is not
    given back, since its handle belongs to sessions that were closed.
    ``connected`` is False while the sessions are not to be used (the token
    is being reconnected, or its module re-initialised): callers then
    reconnect before they borrow. ``touched`` holds each session's last use
    (handle -> monotonic seconds), for the keepalive. After
    :meth:`give_up` (a reconnect failed), borrowers that wait for a session
    fail instead, until the next :meth:`fill`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = False
        self.generation = 0
        self.sessions: list[Any] = []
        self.touched: dict[int, float] = {}  # session handle -> last use (monotonic s)
        self._queue: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._idle = threading.Condition()  # notified when no session is borrowed
        self._borrowed = 0
        self._gone = ""  # why waiting borrowers fail, after give_up()

    def add(self, session: Any) -> None:
        """Keep a newly opened session, to be closed with the others; it is
        lent only after :meth:`fill`."""
        self.sessions.append(session)

    def fill(self) -> None:
        """Start a new generation: lend every kept session, as just used."""
        self.generation += 1
        self._gone = ""
        now = time.monotonic()
        for s in self.sessions:
            self.touched[s.handle] = now
            self._queue.put((self.generation, s))
        self.connected = True

    def close_all(self) -> None:
        """Close every session (C_CloseSession) and forget them."""
        for s in self.sessions:
            try:
                s.close()
            except (pkcs11.PKCS11Error, _p11.P11Error):
                pass  # the session is already gone; that is why we are here
        self.forget()

    def forget(self) -> None:
        """Discard sessions without closing them (the module is being finalised,
        or they were just closed)."""
        self.connected = False
        self.sessions = []
        self.touched = {}
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def give_up(self, message: str) -> None:
        """Make borrowers that wait for a session (which a failed reconnect
        will not bring) raise Unavailable(``message``), until :meth:`fill`."""
        self._gone = message

    def _take(self) -> tuple[int, Any]:
        """The next free session, waiting up to _POOL_WAIT seconds, or less
        after :meth:`give_up`. Raises Unavailable."""
        deadline = time.monotonic() + _POOL_WAIT
        while True:
            try:
                return self._queue.get(timeout=min(_GIVE_UP_EVERY, _POOL_WAIT))
            except queue.Empty:
                if self._gone:
                    raise Unavailable(self._gone) from None
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"token {self.name}: no session free after {_POOL_WAIT:.0f}s"
                    ) from None

    @contextmanager
    def borrow(self) -> Iterator[tuple[int, Any]]:
        """A pooled session, as (generation, python-pkcs11 session), for the
        duration of the block. Raises Unavailable when none is free within
        _POOL_WAIT seconds, or when the pool was given up meanwhile
        (:meth:`give_up`)."""
        gen, s = self._take()
        with self._idle:
            self._borrowed += 1
        try:
            yield gen, s
        finally:
            if gen == self.generation:
                self.touched[s.handle] = time.monotonic()
                self._queue.put((gen, s))
            with self._idle:
                self._borrowed -= 1
                if not self._borrowed:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no session is borrowed; True if so."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._borrowed, timeout)

    @property
    def in_use(self) -> int:
        """Sessions borrowed now."""
        return self._borrowed

    @property
    def has_idle(self) -> bool:
        """Whether a session is free now (so borrowing one would not wait,
        unless another thread takes it first)."""
        return self.connected and not self._queue.empty()

    def check_idle(self, module: _p11.Module, profile: Profile, locks: _ObjectLocks) -> None:
        """Check the login on one idle session (and, if the profile asks,
        that the device answers it), and touch every idle session the
        profile's keepalive says is due. A session in use is left alone: it
        is in use. Raises P11Error or python-pkcs11's PKCS11Error."""
        idle: list[tuple[int, Any]] = []
        while True:
            try:
                idle.append(self._queue.get_nowait())
            except queue.Empty:
                break
        try:
            now = time.monotonic()
            for i, (_, s) in enumerate(idle):
                if i == 0 and not module.logged_in(s.handle):
                    raise _p11.P11Error("C_GetSessionInfo", _p11.CKR_USER_NOT_LOGGED_IN)
                if i == 0 and profile.probe_random:
                    s.generate_random(64)  # reaches the device; raises if it is gone
                keepalive = profile.keepalive
                if keepalive is not None and now - self.touched.get(s.handle, 0) >= keepalive:
                    # A search reaches the device (YubiHSM: a list-objects command
                    # on the device session), which resets its idle timer.
                    with locks.searches.shared():
                        module.find_objects(s.handle, {
                            _p11.CKA_CLASS: _p11.ulong(_p11.CKO_DATA),
                            _p11.CKA_LABEL: _KEEPALIVE_LABEL})
                    self.touched[s.handle] = time.monotonic()
        finally:
            for gen, s in idle:
                if gen == self.generation:
                    self._queue.put((gen, s))
