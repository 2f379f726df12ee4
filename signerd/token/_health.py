"""Whether a token answers now, and getting it back when it does not.

The probe (:meth:`Health.check`) calls ``C_GetTokenInfo``, which reaches the
token's store or device (or, with a profile that asks for it,
``C_GenerateRandom``), and checks that a pooled session is still logged in;
an operation (:meth:`Health.run`) that loses its session, login or device
is retried once after a reconnect. A token that does not answer is
unusable until a reconnect succeeds, and the operator reads one warning
when it goes down and one when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pkcs11

from signerd.errors import FailedPrecondition, InvalidArgument, SignerdError, Unavailable
from signerd.token import _p11
from signerd.token._modules import _PAUSE_WAIT, MODULES
from signerd.token._pool import SessionPool
from signerd.token._slot import Slot

if TYPE_CHECKING:  # annotations only: the Token composes this
    from signerd.token._token import Token

log = logging.getLogger("signerd.token")

_RETRY_EVERY = 1.0  # seconds between reconnect attempts while a token is unusable


class Health:
    """One token's health record, probe and reconnects.

    ``healthy``: whether the token answered its last probe or operation;
    ``last_error``: signerd's wording of why not (clients see it: ListTokens,
    and UNAVAILABLE messages); ``closed``: set once the token is closing,
    after which nothing reconnects (and logs in) again.

    ``lock`` guards reconnects (and, shared with the key store, the key
    index's writers); ``user`` is the Token that :data:`MODULES` knows, for
    a re-initialisation of the module under its other tokens;
    ``load_keys(session)`` re-lists the keys after a reconnect, since key
    handles may have changed.
    """

    def __init__(self, slot: Slot, pool: SessionPool, lock: threading.RLock, user: Token,
                 load_keys: Callable[[Any], None]) -> None:
        self.name = slot.name
        self._slot = slot
        self._pool = pool
        self._lock = lock
        self._user = user
        self._load_keys = load_keys
        self.healthy = False
        self.last_error = ""
        self.closed = False
        self._down_logged = False
        self._next_attempt = 0.0

    def set(self, ok: bool, reason: str = "", detail: str = "") -> None:
        """Record health; warn once when the token goes down and once when
        it is back, however many probes and requests fail in between.
        ``reason`` is signerd's wording (clients see it: ListTokens, and
        UNAVAILABLE messages); ``detail``, the library's own, is logged."""
        self.healthy = ok
        if not ok:
            self.last_error = reason or self.last_error
            if not self._down_logged and not self.closed:
                self._down_logged = True
                log.warning("token unusable", extra={"fields": {
                    "token": self.name, "error": self.last_error,
                    **({"detail": detail} if detail else {})}})
        elif self._down_logged:
            self._down_logged = False
            log.warning("token usable again", extra={"fields": {"token": self.name}})

    def unavailable(self, what: str) -> Unavailable:
        """The error a caller sees while the token is unusable for ``what``."""
        return Unavailable(f"token {self.name} is unavailable ({what or 'reconnecting'}); "
                           "signerd keeps trying to reach it")

    def answers(self, session: Any | None = None) -> bool:
        """Whether the token answers now: C_GetTokenInfo, or with a profile
        that asks for it and a session, C_GenerateRandom (which reaches the
        device where C_GetTokenInfo is answered from a cache)."""
        try:
            if self._slot.profile.probe_random and session is not None:
                session.generate_random(64)
            else:
                self._slot.module.token_info(self._slot.slot_id)
            return True
        except (_p11.P11Error, pkcs11.PKCS11Error) as e:
            self.last_error = _p11.failure_name(e)
            log.debug("token does not answer", extra={"fields": {
                "token": self.name, "detail": _p11.failure_detail(e)}})
        return False

    def connect(self, list_keys: bool = True) -> None:
        """Open the pool, log in once, and (unless told not to) load every key.
        Raises Unavailable, TokenLoginError, ConfigError (see :meth:`Slot.open`)."""
        slot = self._slot
        if slot.login_refused:
            raise Unavailable(
                f"token {self.name}: the token refused the configured PIN; "
                "fix the PIN and restart signerd"
            )
        try:
            first = slot.open(self._pool)
            if first is None:
                self.last_error = "no token matches its uri"
                raise Unavailable(
                    f"token {self.name}: no token matches its uri in module {slot.config.module}"
                )
            if list_keys:  # after a reconnect handles may have changed: re-list now
                with slot.locks.searches.shared():
                    self._load_keys(first)
        except (pkcs11.PKCS11Error, _p11.P11Error) as e:
            reason = _p11.failure_name(e)
            self.set(False, reason, _p11.failure_detail(e))
            raise self.unavailable(reason) from None
        self._pool.fill()
        self.set(True)

    def reconnect(self, seen_generation: int | None = None, probe: bool = False) -> None:
        """Re-open sessions and log in again, unless another thread just did.

        While the token stays unusable, attempts are spaced by
        _RETRY_EVERY so that callers fail fast instead of piling up; the
        health probe (``probe``) may also re-initialise the module under the
        module's other tokens (:meth:`_Modules.reinitialize`).
        Raises Unavailable (or TokenLoginError)."""
        pool = self._pool
        with self._lock:
            if self.closed:
                raise Unavailable(f"token {self.name} is closed: signerd is stopping")
            if (
                seen_generation is not None
                and seen_generation != pool.generation
                and pool.connected
            ):
                return
            now = time.monotonic()
            if not pool.connected and now < self._next_attempt:
                raise self.unavailable(self.last_error)
            self._next_attempt = now + _RETRY_EVERY
            log.debug("reconnecting", extra={"fields": {"token": self.name}})
            pool.connected = False  # new borrowers wait for this reconnect
            # Sessions still borrowed are closed under no thread: a module
            # (tpm2-pkcs11) can lose its device context when a session is
            # closed, or the module finalised, under a call in progress.
            pool.wait_idle(_PAUSE_WAIT)
            pool.close_all()
            try:
                self.connect()
            except Unavailable:
                if self._slot.login_refused or not MODULES.reinitialize(
                        self._slot.config.module, self._user if probe else None):
                    raise
                self.connect()

    def pause(self, timeout: float) -> bool:
        """For a module re-initialisation: hold this token's reconnects and
        wait for its borrowed sessions to come back. True if paused (then
        :meth:`resume` must follow); False, and nothing held, on time-out."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._pool.connected = False  # new borrowers reconnect, and wait for the lock
        self._next_attempt = 0.0  # at once: this token did not fail
        if self._pool.wait_idle(timeout):
            return True
        self._lock.release()
        return False

    def resume(self) -> None:
        """End a :meth:`pause`."""
        self._lock.release()

    def check(self) -> bool:
        """Health probe: the token answers C_GetTokenInfo (which reaches its
        store or device), and a pooled session is still logged in. Idle
        sessions are touched when the profile asks for a keepalive.
        Reconnects when any of it fails; a refused PIN is never retried."""
        if self.closed:
            return False
        slot = self._slot
        try:
            if not self._pool.connected:
                self.reconnect(probe=True)
            if not self.answers():
                with self._lock:
                    self.set(False)
                    self._pool.connected = False  # sessions of a token that went away
                self.reconnect(probe=True)
            self._pool.check_idle(slot.module, slot.profile, slot.locks)
            self.set(True)
        except (_p11.P11Error, pkcs11.PKCS11Error) as e:
            self.set(False, _p11.failure_name(e), _p11.failure_detail(e))
            try:
                self.reconnect(probe=True)
            except SignerdError:
                pass
        except Unavailable:
            self.set(False)  # the reason is already recorded
        except SignerdError as e:
            self.set(False, str(e))
        return self.healthy

    def run(self, what: str, fn: Any,
            guard: Callable[[], AbstractContextManager[None]]) -> Any:
        """Run fn(session) on a pooled session inside ``guard()`` (one of
        _ObjectLocks'), once, and once more after a reconnect if the session,
        login or device was lost (the return value says so, or the token no
        longer answers).

        Raises InvalidArgument (data the token rejects), FailedPrecondition
        (a mechanism or template it cannot do), Unavailable (anything else).
        Messages name the token and the CK_RV (_p11.failure_name), never
        the library's own text: that is logged (_p11.failure_detail)."""
        pool = self._pool
        for attempt in (0, 1):
            if not pool.connected:
                self.reconnect()
            with pool.borrow() as (gen, s), guard():
                try:
                    return fn(s)
                except (_p11.P11Error, pkcs11.PKCS11Error) as e:
                    rv, failure = _p11.failure_rv(e), _p11.failure_name(e)
                    detail = _p11.failure_detail(e)
                refused = rv in _p11.DATA_INVALID | _p11.NOT_SUPPORTED
                alive = refused or self.answers(s)
            lost = not refused and (
                not alive or rv in _p11.SESSION_LOST | _p11.DEVICE_LOST | _p11.HANDLE_LOST)
            retry = lost and attempt == 0
            # A request's own refusal, or a first try retried, is not yet the token's fault.
            (log.info if refused or retry else log.warning)("token operation failed", extra={
                "fields": {"token": self.name, "operation": what, "error": failure,
                           "detail": detail, "retrying": retry}})
            if rv in _p11.DATA_INVALID:
                raise InvalidArgument(f"token {self.name} rejected the data: {failure}")
            if rv in _p11.NOT_SUPPORTED:  # the token is fine; it cannot do this
                raise FailedPrecondition(f"token {self.name} cannot do this {what}: {failure}")
            if not lost:  # the token answers: this operation failed on its own
                raise Unavailable(f"token {self.name}: {what} failed ({failure})")
            if attempt == 1:
                self.set(False, failure, detail)
                raise self.unavailable(failure)
            try:
                self.reconnect(gen)
            except SignerdError:
                self.set(False)
                raise
        raise AssertionError("unreachable")
