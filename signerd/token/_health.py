"""Whether a token answers now, and getting it back when it does not.

The probe (:meth:`Health.check`) calls ``C_GetTokenInfo``, which reaches the
token's store or device (or, with a profile that asks for it,
``C_GenerateRandom``), and checks that a pooled session is still logged in;
an operation (:meth:`Health.run`) that loses its session, login or device
is retried once after a reconnect. A token that does not answer is
unusable until a reconnect succeeds, and the operator reads one warning
when it goes down and one when it is back.

Once a reconnect has failed the token is *down*, and only the health probe
reconnects it: requests fail fast meanwhile (UNAVAILABLE, without waiting
for a lock or starting a reconnect of their own). Were requests to retry
too, each would postpone the next attempt, and under load the probe — the
only caller that may re-initialise the module under a neighbour token that
stayed up, which SoftHSM needs to find a token again — would never get its
turn (issue 24 §3: at 20 signs per second a token never came back). So a
token is usable again at the first probe after its return: within one
``health_interval`` plus the probe's own time, whatever the request rate.

A device whose sessions are all taken (``CKR_SESSION_COUNT``: a YubiHSM 2
has 16, shared by every process and host that uses it, and keeps a dead
process's sessions until they have been idle for 30 s) gets backoff: at
start, :meth:`Health.open` tries again for up to :data:`_BUDGET_WAIT`
seconds; later, the probe waits longer between attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pkcs11

from signerd.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SignerdError,
    Unavailable,
)
from signerd.token import _p11
from signerd.token._modules import _PAUSE_WAIT, MODULES
from signerd.token._pool import SessionPool
from signerd.token._slot import Slot

if TYPE_CHECKING:  # annotations only: the Token composes this
    from signerd.token._token import Token

log = logging.getLogger("signerd.token")

# CKR_SESSION_COUNT: the device has no session free for this process.
_BUDGET_WAIT = 40.0  # seconds a token's first connection keeps trying; a YubiHSM 2
# frees a dead process's sessions once they have been idle for 30 s
_BUDGET_BACKOFF = (0.5, 30.0)  # seconds: first and longest wait between attempts


class Health:
    """One token's health record, probe and reconnects.

    ``healthy``: whether the token answered its last probe or operation;
    ``last_error``: signerd's wording of why not (clients see it: ListTokens,
    and UNAVAILABLE messages); ``down``: a reconnect failed, and none has
    succeeded since, so only the probe reconnects (see the module's doc);
    ``closed``: set once the token is closing, after which nothing
    reconnects (and logs in) again.

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
        self.down = False
        self._down_logged = False
        self._busy = 0  # CKR_SESSION_COUNT answers in a row
        self._busy_until = 0.0  # monotonic s: no probe reconnect before, after one

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

    def _down_error(self) -> Unavailable:
        """The error a caller sees while the token is down: a refused PIN
        (never retried) says so, anything else is :meth:`unavailable`."""
        if self._slot.login_refused:
            return Unavailable(f"token {self.name}: the token refused the configured PIN; "
                               "fix the PIN and restart signerd")
        return self.unavailable(self.last_error)

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

    def budget_used_up(self) -> str:
        """What signerd says of ``CKR_SESSION_COUNT``: the device's session
        budget, and who shares it."""
        limit = self._slot.profile.max_sessions
        budget = (f"it allows {limit} sessions in all" if limit is not None
                  else "its session budget is used up")
        return (f"CKR_SESSION_COUNT: the device has no session free; {budget}, shared by "
                f"every process and host that uses it (this token's pool opens "
                f"{self._slot.config.sessions} per process), and a process that died holds "
                "its sessions until the device closes them as idle")

    def open(self) -> None:
        """The first connection, without listing keys (:meth:`connect`),
        tried again with backoff while the device has no session free: for up
        to :data:`_BUDGET_WAIT` seconds, enough for a YubiHSM 2 to close the
        sessions of a process that died (idle for 30 s). Raises
        ResourceExhausted when the budget stays used up (its message names
        it), else as :meth:`connect`."""
        deadline = time.monotonic() + _BUDGET_WAIT
        wait = _BUDGET_BACKOFF[0]
        while True:
            try:
                self.connect(list_keys=False)
                return
            except Unavailable:
                if not self._busy:
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(
                        f"token {self.name}: {self.last_error}; none came free in "
                        f"{_BUDGET_WAIT:.0f}s: lower the sessions of the tokens on this "
                        "device, or the worker processes or hosts that use it") from None
                log.warning("the device has no session free; trying again", extra={"fields": {
                    "token": self.name, "seconds": round(min(wait, left), 2),
                    "max_sessions": self._slot.profile.max_sessions}})
                time.sleep(min(wait, left))
                wait = min(wait * 2, _BUDGET_BACKOFF[1])

    def connect(self, list_keys: bool = True) -> None:
        """Open the pool, log in once, and (unless told not to) load every key.
        Raises Unavailable (for a device with no session free, naming its
        budget: :meth:`budget_used_up`), TokenLoginError, ConfigError (see
        :meth:`Slot.open`)."""
        slot = self._slot
        busy, self._busy = self._busy, 0
        if slot.login_refused:
            raise self._down_error()
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
            if _p11.failure_rv(e) == _p11.CKR_SESSION_COUNT:
                # The sessions opened so far would hold the budget that
                # this, or another, process waits for.
                self._pool.close_all()
                self._busy = busy + 1
                reason = self.budget_used_up()
            self.set(False, reason, _p11.failure_detail(e))
            raise self.unavailable(reason) from None
        self._pool.fill()
        self.set(True)

    def reconnect(self, seen_generation: int | None = None, probe: bool = False) -> None:
        """Re-open sessions and log in again.

        A request (not ``probe``) reconnects a token that was usable: its
        pool was reset (a neighbour's module re-initialisation) or its
        session was lost (``seen_generation``: the pool's generation when
        its session was borrowed). Nothing is done if another thread has
        reconnected meanwhile. Once a reconnect has failed the token is
        ``down``, and a request fails fast without taking the lock: only
        the health probe (``probe``) reconnects it then, every time it
        runs, and it may re-initialise the module under the module's other
        tokens (:meth:`_Modules.reinitialize`). After CKR_SESSION_COUNT the
        probe's attempts back off (up to 30 s apart).
        Raises Unavailable (or TokenLoginError)."""
        pool = self._pool
        if self.down and not probe:
            raise self._down_error()
        with self._lock:
            if self.closed:
                raise Unavailable(f"token {self.name} is closed: signerd is stopping")
            if not probe:
                if pool.connected and seen_generation != pool.generation:
                    return  # reconnected by another thread (or not lost at all)
                if self.down:  # the reconnect this request waited for failed
                    raise self._down_error()
            elif self._busy and time.monotonic() < self._busy_until:
                raise self.unavailable(self.last_error)
            log.debug("reconnecting", extra={"fields": {"token": self.name}})
            pool.connected = False  # new borrowers wait for this reconnect
            # Sessions still borrowed are closed under no thread: a module
            # (tpm2-pkcs11) can lose its device context when a session is
            # closed, or the module finalised, under a call in progress.
            pool.wait_idle(_PAUSE_WAIT)
            pool.close_all()
            try:
                try:
                    self.connect()
                except Unavailable:
                    if self._busy or self._slot.login_refused or not MODULES.reinitialize(
                            self._slot.config.module, self._user if probe else None):
                        raise
                    self.connect()
            except SignerdError:
                self.down = True
                pool.give_up(str(self._down_error()))
                if self._busy:
                    self._busy_until = time.monotonic() + min(
                        _BUDGET_BACKOFF[0] * 2 ** self._busy, _BUDGET_BACKOFF[1])
                raise
            self.down = False

    def pause(self, timeout: float) -> bool:
        """For a module re-initialisation: hold this token's reconnects and
        wait for its borrowed sessions to come back. True if paused (then
        :meth:`resume` must follow); False, and nothing held, on time-out."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._pool.connected = False  # new borrowers reconnect, and wait for the lock
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
