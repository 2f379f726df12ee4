"""PKCS#11 tokens: load modules, log in, pool sessions, cache key handles, watch health.

The signing path is: take a pooled session, ``C_SignInit`` + ``C_Sign`` with
the cached private key handle, give the session back. No ``C_FindObjects``,
no session open/close, no login. When the token says the session or login is
gone, the token is re-opened once (new sessions, login, key handles) and the
operation retried once; only then does the caller see :class:`Unavailable`.

Health is whether the token answers now: the probe (:meth:`Token.check`)
calls ``C_GetTokenInfo``, which reaches the token's store or device, and a
failure makes the token unusable until a reconnect succeeds. A key search
whose token stops answering meanwhile is not believed either, so a token
that goes away never turns known keys into NOT_FOUND.

How keys and their metadata sit on the token is :mod:`signerd.token._layout`'s
business; there is no other database, so a restarted daemon, or a second
daemon on the same token, sees the same keys.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pkcs11
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, ObjectClass

from signerd.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerdError,
    TokenLoginError,
    Unavailable,
)
from signerd.keys import Algorithm, KeyID, key_id, tuf_public_bytes
from signerd.token import _layout, _p11
from signerd.token._listing import KeyEntry, material, read_keys
from signerd.token._locks import _ObjectLocks, _SharedLock
from signerd.token._modules import _PAUSE_WAIT, MODULES, _Modules
from signerd.token.profiles import PROFILES, MechanismInfo, Profile, detect, supported_algorithms

if TYPE_CHECKING:  # annotations only: signerd.config imports signerd.token.profiles
    from signerd.config import TokenConfig

__all__ = [
    "MODULES",
    "KeyEntry",
    "Token",
    "TokenStatus",
    "_Modules",
    "_ObjectLocks",
    "_SharedLock",
    "_layout",
    "_p11",
]

log = logging.getLogger("signerd.token")

_POOL_WAIT = 30.0  # seconds a request waits for a free session before UNAVAILABLE
_CLOSE_WAIT = 30.0  # seconds close() waits for sessions in use to come back
_RETRY_EVERY = 1.0  # seconds between reconnect attempts while a token is unusable
_ID_ATTEMPTS = 8  # tries at a free 2-byte CKA_ID before giving up
_KEEPALIVE_LABEL = b"signerd-keepalive"  # searched for, never created


@dataclass(frozen=True)
class TokenStatus:
    """What ``signerctl tokens list`` shows of a token."""

    name: str
    module: str
    profile: str
    manufacturer: str
    model: str
    serial: str
    label: str
    healthy: bool
    error: str
    algorithms: tuple[str, ...]
    key_count: int
    sessions: int
    free_public_memory: int | None
    free_private_memory: int | None


class Token:
    """One configured token: its login, session pool, key cache and health.

    Raises, when opened: :class:`TokenLoginError` for a refused PIN,
    :class:`ConfigError` for a module that cannot be loaded or a session
    budget the token's profile does not allow, :class:`Unavailable` for a
    token that cannot be reached (tried again by the caller)."""

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.name = config.name
        self._pin = config.read_pin().encode()
        self._lib: _p11.ThreadSafeLib | None = MODULES.acquire(config.module, self)
        self.module = self._lib.module
        self._lock = threading.RLock()  # guards reconnects and the key cache's writers
        self._generation = 0
        self._pool: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._sessions: list[Any] = []
        self._touched: dict[int, float] = {}  # session handle -> last use (monotonic s)
        self._keys: dict[KeyID, KeyEntry] = {}
        self._miss_lock = threading.Lock()
        self._mark_lock = threading.Lock()  # one "has signed" write at a time
        self._made: dict[KeyID, float] = {}  # keys generated here -> when (monotonic s)
        self._gone: dict[KeyID, float] = {}  # keys deleted here -> when (monotonic s)
        self._locks = _ObjectLocks()  # replaced by the token's own in _connect
        self._login_refused = False
        self._connected = False
        self._last_error = ""
        self._next_attempt = 0.0
        self._healthy = False
        self._down_logged = False
        self._token: Any = None
        self.slot_id = -1
        self.info: _p11.TokenInfo | None = None
        self.profile: Profile = PROFILES[config.profile or "generic"]
        self.algorithms: tuple[str, ...] = ()
        self._listed = threading.Event()
        self._lister: threading.Thread | None = None
        self._idle = threading.Condition()  # notified when no session is borrowed
        self._borrowed = 0
        self._closed = False  # once closed, never reconnects (and logs in) again
        try:
            self._connect(list_keys=False)
        except BaseException:
            self.close()
            raise
        # The first listing runs in the background, so the daemon serves at
        # once even with many keys: a key not listed yet is found by its ID
        # (lookup), and only listings wait for it.
        self._lister = threading.Thread(target=self._first_listing, name=f"list-{self.name}",
                                         daemon=True)
        self._lister.start()

    def _first_listing(self) -> None:
        start = time.monotonic()
        try:
            self.refresh()
            log.info("keys listed", extra={"fields": {
                "token": self.name, "keys": len(self._keys),
                "seconds": round(time.monotonic() - start, 3)}})
        except SignerdError as e:
            log.error("cannot list keys", extra={"fields": {"token": self.name, "error": str(e)}})
        finally:
            self._listed.set()

    # -- health -------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the token answered its last probe or operation."""
        return self._healthy

    def _set_health(self, ok: bool, reason: str = "", detail: str = "") -> None:
        """Record health; warn once when the token goes down and once when
        it is back, however many probes and requests fail in between.
        ``reason`` is signerd's wording (clients see it: ListTokens, and
        UNAVAILABLE messages); ``detail``, the library's own, is logged."""
        self._healthy = ok
        if not ok:
            self._last_error = reason or self._last_error
            if not self._down_logged and not self._closed:
                self._down_logged = True
                log.warning("token unusable", extra={"fields": {
                    "token": self.name, "error": self._last_error,
                    **({"detail": detail} if detail else {})}})
        elif self._down_logged:
            self._down_logged = False
            log.warning("token usable again", extra={"fields": {"token": self.name}})

    def _unavailable(self, what: str) -> Unavailable:
        return Unavailable(f"token {self.name} is unavailable ({what or 'reconnecting'}); "
                           "signerd keeps trying to reach it")

    # -- connection ---------------------------------------------------------

    def _find_token(self) -> Any:
        uri = self.config.uri
        assert self._lib is not None
        for slot in self._lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            tok = slot.get_token()
            if uri.token is not None and tok.label != uri.token:
                continue
            if uri.serial is not None and tok.serial.decode().strip() != uri.serial:
                continue
            return tok
        self._last_error = "no token matches its uri"
        raise Unavailable(
            f"token {self.name}: no token matches its uri in module {self.config.module}"
        )

    def _learn(self, info: _p11.TokenInfo) -> None:
        """At the first connection: the token's profile and capabilities."""
        if self.info is not None:
            return
        if self.config.profile is None:
            self.profile = detect(self.config.module, info.manufacturer)
        limit = self.profile.max_sessions
        if limit is not None and self.config.sessions * self.config.processes > limit:
            self._login_refused = True  # a config fault: never retried
            raise ConfigError(
                f"token {self.name} ({self.profile.name}) allows {limit} sessions in all, but "
                f"its pool needs {self.config.sessions} × {self.config.processes} worker "
                "process(es); lower its sessions or server.workers"
            )
        slot = self._token.slot
        mechanisms: dict[int, MechanismInfo] = {}
        for mech in slot.get_mechanisms():
            value = int(mech)
            try:
                mi = slot.get_mechanism_info(mech)
                mechanisms[value] = MechanismInfo(int(mi.min_key_length or 0),
                                                  int(mi.max_key_length or 0), int(mi.flags))
            except pkcs11.PKCS11Error:
                continue  # listed but not described: not one to rely on
        self.algorithms = supported_algorithms(mechanisms, self.profile)
        self.info = info
        log.info("token found", extra={"fields": {
            "token": self.name, "profile": self.profile.name,
            "manufacturer": info.manufacturer, "model": info.model,
            "algorithms": list(self.algorithms)}})

    def _connect(self, list_keys: bool = True) -> None:
        """Open the pool, log in once, and (unless told not to) load every key."""
        if self._login_refused:
            raise Unavailable(
                f"token {self.name}: the token refused the configured PIN; "
                "fix the PIN and restart signerd"
            )
        try:
            self._token = self._find_token()
            self.slot_id = self._token.slot.slot_id
            self._learn(self.module.token_info(self.slot_id))
            self._locks = MODULES.object_locks(self.config.module, self.slot_id)
            first = self._token.open(rw=True)
            self._sessions.append(first)
            try:
                self.module.login(first.handle, self._pin)
            except _p11.P11Error as e:
                if e.rv in (_p11.CKR_PIN_INCORRECT, _p11.CKR_PIN_LOCKED):
                    # Never retried: SoftHSM never locks a PIN, so a retry
                    # loop would be an unlimited guessing oracle.
                    self._login_refused = True
                    raise TokenLoginError(
                        f"token {self.name}: login refused ({_p11.rv_name(e.rv)}); "
                        "check the PIN file or environment variable"
                    ) from None
                raise
            for _ in range(self.config.sessions - 1):
                self._sessions.append(self._token.open(rw=True))
            if list_keys:  # after a reconnect handles may have changed: re-list now
                with self._locks.searches.shared():
                    self._load_keys(first)
        except (pkcs11.PKCS11Error, _p11.P11Error) as e:
            reason = _p11.failure_name(e)
            self._set_health(False, reason, _p11.failure_detail(e))
            raise self._unavailable(reason) from None
        self._generation += 1
        now = time.monotonic()
        for s in self._sessions:
            self._touched[s.handle] = now
            self._pool.put((self._generation, s))
        self._connected = True
        self._set_health(True)

    def _drop_sessions(self) -> None:
        for s in self._sessions:
            try:
                s.close()
            except (pkcs11.PKCS11Error, _p11.P11Error):
                pass  # the session is already gone; that is why we are here
        self.forget_sessions()

    @property
    def connected(self) -> bool:
        return self._connected

    def forget_sessions(self) -> None:
        """Discard sessions without closing them (the module is being finalised,
        or they were just closed)."""
        self._connected = False
        self._sessions = []
        self._touched = {}
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break

    def pause(self, timeout: float) -> bool:
        """For a module re-initialisation: hold this token's reconnects and
        wait for its borrowed sessions to come back. True if paused (then
        :meth:`resume` must follow); False, and nothing held, on time-out."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._connected = False  # new borrowers reconnect, and wait for the lock
        self._next_attempt = 0.0  # at once: this token did not fail
        with self._idle:
            if self._idle.wait_for(lambda: not self._borrowed, timeout):
                return True
        self._lock.release()
        return False

    def resume(self) -> None:
        self._lock.release()

    def reconnect(self, seen_generation: int | None = None, probe: bool = False) -> None:
        """Re-open sessions and log in again, unless another thread just did.

        While the token stays unusable, attempts are spaced by
        _RETRY_EVERY so that callers fail fast instead of piling up; the
        health probe (``probe``) may also re-initialise the module under the
        module's other tokens (:meth:`_Modules.reinitialize`).
        Raises Unavailable (or TokenLoginError)."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"token {self.name} is closed: signerd is stopping")
            if (
                seen_generation is not None
                and seen_generation != self._generation
                and self._connected
            ):
                return
            now = time.monotonic()
            if not self._connected and now < self._next_attempt:
                raise self._unavailable(self._last_error)
            self._next_attempt = now + _RETRY_EVERY
            log.debug("reconnecting", extra={"fields": {"token": self.name}})
            self._connected = False  # new borrowers wait for this reconnect
            # Sessions still borrowed are closed under no thread: a module
            # (tpm2-pkcs11) can lose its device context when a session is
            # closed, or the module finalised, under a call in progress.
            with self._idle:
                self._idle.wait_for(lambda: not self._borrowed, _PAUSE_WAIT)
            self._drop_sessions()
            try:
                self._connect()
            except Unavailable:
                if self._login_refused or not MODULES.reinitialize(
                        self.config.module, self if probe else None):
                    raise
                self._connect()

    def close(self) -> None:
        if self._lister is not None:
            self._lister.join()  # its session must not close under it
        with self._lock:
            # From here on, nothing logs in again: a late health probe or
            # request would otherwise reconnect a token that is being closed.
            self._closed = True
        # Nor may a session in use: closing it, or finalising the module, under
        # a thread still inside C_Sign is undefined behaviour in the module.
        with self._idle:
            if not self._idle.wait_for(lambda: not self._borrowed, _CLOSE_WAIT):
                log.warning("closing a token with sessions still in use",
                            extra={"fields": {"token": self.name, "in_use": self._borrowed}})
        with self._lock:
            # The login belongs to the token, not to this object: another Token
            # of this process on the same token would be logged out with it.
            if self._sessions and not MODULES.shares_login(self):
                self.module.logout(self._sessions[0].handle)
            self._drop_sessions()
            self._healthy = False
            if self._lib is not None:
                MODULES.release(self.config.module, self)
                self._lib = None

    @contextmanager
    def session(self) -> Iterator[tuple[int, Any]]:
        """Borrow a pooled session: (generation, python-pkcs11 session)."""
        if not self._connected:
            self.reconnect()
        try:
            gen, s = self._pool.get(timeout=_POOL_WAIT)
        except queue.Empty:
            raise Unavailable(
                f"token {self.name}: no session free after {_POOL_WAIT:.0f}s"
            ) from None
        with self._idle:
            self._borrowed += 1
        try:
            yield gen, s
        finally:
            if gen == self._generation:
                self._touched[s.handle] = time.monotonic()
                self._pool.put((gen, s))
            with self._idle:
                self._borrowed -= 1
                if not self._borrowed:
                    self._idle.notify_all()

    def _answers(self, session: Any | None = None) -> bool:
        """Whether the token answers now: C_GetTokenInfo, or with a profile
        that asks for it and a session, C_GenerateRandom (which reaches the
        device where C_GetTokenInfo is answered from a cache)."""
        try:
            if self.profile.probe_random and session is not None:
                session.generate_random(64)
            else:
                self.module.token_info(self.slot_id)
            return True
        except (_p11.P11Error, pkcs11.PKCS11Error) as e:
            self._last_error = _p11.failure_name(e)
            log.debug("token does not answer", extra={"fields": {
                "token": self.name, "detail": _p11.failure_detail(e)}})
        return False

    def _with_retry(self, what: str, fn: Any,
                    guard: Callable[[], AbstractContextManager[None]]) -> Any:
        """Run fn(session) inside ``guard()`` (one of _ObjectLocks'), once, and
        once more after a reconnect if the session, login or device was lost
        (the return value says so, or the token no longer answers).

        Raises InvalidArgument (data the token rejects), FailedPrecondition
        (a mechanism or template it cannot do), Unavailable (anything else).
        Messages name the token and the CK_RV (_p11.failure_name), never
        the library's own text: that is logged (_p11.failure_detail)."""
        for attempt in (0, 1):
            with self.session() as (gen, s), guard():
                try:
                    return fn(s)
                except (_p11.P11Error, pkcs11.PKCS11Error) as e:
                    rv, failure = _p11.failure_rv(e), _p11.failure_name(e)
                    detail = _p11.failure_detail(e)
                refused = rv in _p11.DATA_INVALID | _p11.NOT_SUPPORTED
                alive = refused or self._answers(s)
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
                self._set_health(False, failure, detail)
                raise self._unavailable(failure)
            try:
                self.reconnect(gen)
            except SignerdError:
                self._set_health(False)
                raise
        raise AssertionError("unreachable")

    def check(self) -> bool:
        """Health probe: the token answers C_GetTokenInfo (which reaches its
        store or device), and a pooled session is still logged in. Idle
        sessions are touched when the profile asks for a keepalive.
        Reconnects when any of it fails; a refused PIN is never retried."""
        if self._closed:
            return False
        try:
            if not self._connected:
                self.reconnect(probe=True)
            if not self._answers():
                with self._lock:
                    self._set_health(False)
                    self._connected = False  # sessions of a token that went away
                self.reconnect(probe=True)
            self._check_idle_sessions()
            self._set_health(True)
        except (_p11.P11Error, pkcs11.PKCS11Error) as e:
            self._set_health(False, _p11.failure_name(e), _p11.failure_detail(e))
            try:
                self.reconnect(probe=True)
            except SignerdError:
                pass
        except Unavailable:
            self._set_health(False)  # the reason is already recorded
        except SignerdError as e:
            self._set_health(False, str(e))
        return self._healthy

    def _check_idle_sessions(self) -> None:
        """Check the login on one idle session (and, if the profile asks,
        that the device answers it), and touch every idle session the
        profile's keepalive says is due. A session in use is left alone: it
        is in use. Raises P11Error or python-pkcs11's PKCS11Error."""
        idle: list[tuple[int, Any]] = []
        while True:
            try:
                idle.append(self._pool.get_nowait())
            except queue.Empty:
                break
        try:
            now = time.monotonic()
            for i, (_, s) in enumerate(idle):
                if i == 0 and not self.module.logged_in(s.handle):
                    raise _p11.P11Error("C_GetSessionInfo", _p11.CKR_USER_NOT_LOGGED_IN)
                if i == 0 and self.profile.probe_random:
                    s.generate_random(64)  # reaches the device; raises if it is gone
                keepalive = self.profile.keepalive
                if keepalive is not None and now - self._touched.get(s.handle, 0) >= keepalive:
                    # A search reaches the device (YubiHSM: a list-objects command
                    # on the device session), which resets its idle timer.
                    with self._locks.searches.shared():
                        self.module.find_objects(s.handle, {
                            _p11.CKA_CLASS: _p11.ulong(_p11.CKO_DATA),
                            _p11.CKA_LABEL: _KEEPALIVE_LABEL})
                    self._touched[s.handle] = time.monotonic()
        finally:
            for gen, s in idle:
                if gen == self._generation:
                    self._pool.put((gen, s))

    def status(self) -> TokenStatus:
        """The token as ``signerctl tokens list`` shows it."""
        info = self.info
        return TokenStatus(
            name=self.name, module=self.config.module, profile=self.profile.name,
            manufacturer=info.manufacturer if info else "", model=info.model if info else "",
            serial=info.serial if info else "", label=info.label if info else "",
            healthy=self._healthy, error="" if self._healthy else self._last_error,
            algorithms=self.algorithms, key_count=len(self._keys),
            sessions=self.config.sessions,
            free_public_memory=info.free_public_memory if info else None,
            free_private_memory=info.free_private_memory if info else None,
        )

    # -- keys ---------------------------------------------------------------

    def _load_keys(self, s: Any) -> None:
        self._keys = self._read_keys(s)

    def _read_keys(self, s: Any, only: KeyID | None = None) -> dict[KeyID, KeyEntry]:
        return read_keys(self.module, self.profile, self.name, s, self._answers, only)

    def keys(self) -> list[KeyEntry]:
        """Every key on the token (waits for the first listing to finish)."""
        self._listed.wait()
        return list(self._keys.values())

    def get(self, kid: KeyID) -> KeyEntry | None:
        return self._keys.get(kid)

    def known_keys(self) -> list[KeyEntry]:
        """The keys listed so far (does not wait for the first listing)."""
        return list(self._keys.values())

    @property
    def sessions_in_use(self) -> int:
        """Pooled sessions borrowed now."""
        return self._borrowed

    @property
    def session_idle(self) -> bool:
        """Whether a pooled session is free now (so borrowing one would not
        wait, unless another thread takes it first)."""
        return self._connected and not self._pool.empty()

    def check_algorithm(self, alg: Algorithm) -> None:
        """Raise FailedPrecondition unless the token can create ``alg`` keys."""
        if alg.name not in self.algorithms:
            can = ", ".join(self.algorithms) or "no algorithm signerd uses"
            raise FailedPrecondition(
                f"token {self.name} cannot create {alg.name} keys; it supports {can}"
            )

    def _free_object_id(self, s: Any) -> bytes:
        """A 2-byte CKA_ID that no key on the token has."""
        for _ in range(_ID_ATTEMPTS):
            candidate = _layout.new_object_id()
            if not self.module.find_objects(s.handle, {_p11.CKA_ID: candidate}):
                return candidate
        raise Unavailable(f"token {self.name}: found no free 2-byte CKA_ID; is it full?")

    def generate(self, alg: Algorithm, gun: str, role: str) -> KeyEntry:
        """Generate a key pair on the token, in layout 2, with its metadata
        object. The private key is a sensitive, non-extractable token object
        that can only sign.

        Raises FailedPrecondition (an algorithm the token cannot do),
        Unavailable."""
        self.check_algorithm(alg)
        label = _layout.key_label(alg).decode()  # python-pkcs11 takes str labels

        def templates(object_id: bytes) -> tuple[dict[Any, Any], dict[Any, Any]]:
            # CKA_ID and CKA_LABEL are the same on both halves and set here,
            # never afterwards: a YubiHSM would need a meta object for either.
            pub: dict[Any, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
                Attribute.ID: object_id,
                Attribute.LABEL: label,
            }
            priv: dict[Any, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
                Attribute.ID: object_id,
                Attribute.LABEL: label,
            }
            if self.profile.ties_sign_to_decrypt:
                # DEFAULT drops the attribute from python-pkcs11's own template too.
                pub[Attribute.ENCRYPT] = priv[Attribute.DECRYPT] = pkcs11.DEFAULT
            if alg.keytype == "rsa":
                pub[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
                pub[Attribute.MODULUS_BITS] = alg.bits
            else:
                pub[Attribute.EC_PARAMS] = _layout.CURVE_OIDS[alg.curve or "ed25519"]
            return pub, priv

        if alg.keytype == "rsa":
            key_type, bits, mech = KeyType.RSA, alg.bits, Mechanism.RSA_PKCS_KEY_PAIR_GEN
        elif alg.keytype == "ed25519":
            key_type, bits, mech = KeyType.EC_EDWARDS, None, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        else:
            key_type, bits, mech = KeyType.EC, None, Mechanism.EC_KEY_PAIR_GEN

        def gen(s: Any) -> KeyEntry | None:
            # The free-ID search is also the search before a write that
            # _sync_index explains: one scan of the token, not two.
            object_id = self._free_object_id(s)
            pub_tpl, priv_tpl = templates(object_id)
            pub, priv = s.generate_keypair(
                key_type, bits, store=True, mechanism=mech, capabilities=0,
                public_template=pub_tpl, private_template=priv_tpl,
            )
            made = [priv, pub]
            try:
                attrs = material(self.module, s.handle, pub.handle, alg)
                spki = _layout.spki(alg, attrs[_p11.CKA_EC_POINT], attrs[_p11.CKA_MODULUS],
                                    attrs[_p11.CKA_PUBLIC_EXPONENT])
                kid = key_id(alg.keytype, tuf_public_bytes(alg.keytype, spki))
                meta = _layout.KeyMeta(alg, gun, role, kid, object_id)
                made.append(s.create_object({
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: self.profile.private_data,
                    Attribute.LABEL: _layout.meta_label(kid).decode(),
                    Attribute.APPLICATION: _layout.APPLICATION.decode(),
                    Attribute.VALUE: _layout.meta_value(meta),
                }))
                # Another process may have taken the same CKA_ID meanwhile:
                # then ours is undone and made again with another.
                if len(self.module.find_objects(s.handle, {_p11.CKA_ID: object_id})) != 2:
                    raise _Collision()
            except BaseException as e:
                for obj in made:
                    try:
                        obj.destroy()
                    except (pkcs11.PKCS11Error, _p11.P11Error):
                        pass  # best effort; a leftover half is skipped when listing
                if isinstance(e, _Collision):
                    return None
                raise
            return KeyEntry(kid, alg, gun, role, self.name, spki, False, priv.handle,
                            object_id, 2)

        entry: KeyEntry | None = None
        for _ in range(_ID_ATTEMPTS):
            entry = self._with_retry("key generation", gen, self._locks.searches.exclusive)
            if entry is not None:
                break
        if entry is None:
            raise Unavailable(f"token {self.name}: key generation kept colliding on CKA_ID")
        with self._lock:
            self._keys[entry.key_id] = entry
            self._made[entry.key_id] = time.monotonic()
        log.info("key created", extra={"fields": {
            "token": self.name, "key_id": entry.key_id, "algorithm": alg.name,
            "gun": gun, "role": role}})
        return entry

    @staticmethod
    def _sync_index(s: Any) -> None:
        """Let the module notice objects other processes made, before we write.

        SoftHSM's file store re-reads its directory only when the token's
        generation counter changed under it, and its own writes bump that
        counter past other processes' writes without re-reading. A search
        (which matches nothing) before each write keeps a second daemon's
        keys visible to this one. Other modules just answer the search.
        """
        list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "signerd-sync"}))

    def _objects(self, s: Any, entry: KeyEntry) -> list[Any]:
        """Every object of a key: the pair, its metadata and "has signed" objects."""
        found = list(s.get_objects({Attribute.ID: entry.object_id}))
        if entry.layout == 2:
            for label in (_layout.meta_label(entry.key_id), _layout.used_label(entry.key_id)):
                found += list(s.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                             Attribute.LABEL: label.decode()}))
        return found

    def delete(self, kid: KeyID) -> None:
        entry = self._keys.get(kid)
        if entry is None:
            raise NotFound(f"no key {kid} on token {self.name}")

        def destroy(s: Any) -> None:
            for obj in self._objects(s, entry):
                obj.destroy()

        self._with_retry("key deletion", destroy, self._locks.searches.shared)
        with self._lock:
            self._keys.pop(kid, None)
            self._made.pop(kid, None)
            self._gone[kid] = time.monotonic()

    @contextmanager
    def _relabelling(self) -> Iterator[None]:
        """A relabel searches for the key's objects, then rewrites them."""
        with self._locks.searches.shared(), self._locks.signing.exclusive():
            yield

    def mark_used(self, kid: KeyID) -> None:
        """Record on the token that the key has signed (Notary's reuse rule):
        a new "has signed" object in layout 2, a rewritten label in layout 1.
        Once: a key whose cached entry says used costs a dict lookup; threads
        signing a new key together write one object, and a "has signed"
        object another process wrote is not written again."""
        entry = self._keys.get(kid)
        if entry is None or entry.used:
            return
        with self._mark_lock:
            entry = self._keys.get(kid)
            if entry is None or entry.used:
                return
            self._write_used(entry)
            with self._lock:
                self._keys[kid] = replace(entry, used=True)

    def _write_used(self, entry: KeyEntry) -> None:
        kid = entry.key_id
        if entry.layout == 1:
            label = _layout.v1_label(entry.algorithm, entry.gun, entry.role, used=True)

            def relabel(s: Any) -> None:
                for obj in self._objects(s, entry):
                    obj[Attribute.LABEL] = label.decode()

            self._with_retry("key relabel", relabel, self._relabelling)
        else:
            def record(s: Any) -> None:
                self._sync_index(s)
                if list(s.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                       Attribute.LABEL: _layout.used_label(kid).decode()})):
                    return  # another process recorded it
                s.create_object({
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: self.profile.private_data,
                    Attribute.LABEL: _layout.used_label(kid).decode(),
                    Attribute.APPLICATION: _layout.APPLICATION.decode(),
                    Attribute.VALUE: b"1",
                })

            # A new object: no search may read it half-written (see _ObjectLocks).
            self._with_retry("recording a key's first signature", record,
                             self._locks.searches.exclusive)

    # -- certificates ---------------------------------------------------------

    def _known(self, kid: KeyID) -> KeyEntry:
        entry = self._keys.get(kid) or self.lookup(kid)
        if entry is None:
            raise NotFound(f"no key {kid} on token {self.name}")
        return entry

    def certificates(self, kid: KeyID) -> list[bytes]:
        """The DER X.509 certificates stored for key ``kid``: the values of
        the CKO_CERTIFICATE objects of type CKC_X_509 with the key pair's
        CKA_ID (one, when only signerd writes them; see :mod:`signerd.token._layout`).
        Nothing is checked here: the caller compares each certificate's
        public key with the key's.

        Raises NotFound (no key ``kid`` on this token), Unavailable (the token
        does not answer: a token that went away answers searches with
        nothing, which is not "no certificate")."""
        entry = self._known(kid)
        template = {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_CERTIFICATE),
                    _p11.CKA_ID: entry.object_id}

        x509_type = _p11.ulong(_p11.CKC_X_509)

        def read(s: Any) -> list[bytes]:
            m, h = self.module, s.handle
            reader = m.attribute_reader({_p11.CKA_CERTIFICATE_TYPE: len(x509_type),
                                         _p11.CKA_VALUE: 2048})
            found = []
            for handle in m.find_objects(h, template):
                attrs = reader.read(h, handle)
                value = attrs[_p11.CKA_VALUE]
                if attrs[_p11.CKA_CERTIFICATE_TYPE] == x509_type and value:
                    found.append(value)
            if not self._answers(s):
                raise _p11.P11Error("C_GetTokenInfo", _p11.CKR_DEVICE_REMOVED)
            return found

        result: list[bytes] = self._with_retry("certificate lookup", read,
                                                self._locks.searches.shared)
        return result

    def store_certificate(self, kid: KeyID, der: bytes, subject: bytes, issuer: bytes,
                          serial: bytes) -> None:
        """Store ``der`` (a DER X.509 certificate) as key ``kid``'s
        certificate, replacing the ones it had: a CKO_CERTIFICATE object of
        type CKC_X_509 with the key pair's CKA_ID, public, labelled by
        :func:`signerd.token._layout.cert_label`. ``subject`` and ``issuer`` are the
        certificate's DER Names and ``serial`` the DER INTEGER of its serial
        number, as CKA_SUBJECT, CKA_ISSUER and CKA_SERIAL_NUMBER hold them
        (PKCS#11 v2.40 §4.6.3).

        The old objects are destroyed before the new one is made, since a
        YubiHSM keeps one opaque object per ID: if the token then refuses the
        new one, the key has no certificate until it is certified again.
        Creating an object holds the searches lock alone (see _ObjectLocks).

        Raises NotFound, FailedPrecondition (the token refuses the template),
        Unavailable."""
        entry = self._known(kid)

        def write(s: Any) -> None:
            self._sync_index(s)
            # The search ends before the first object is destroyed.
            for old in list(s.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                           Attribute.ID: entry.object_id})):
                old.destroy()
            s.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                # Certificates are public; YubiHSM and tpm2-pkcs11 refuse private ones.
                Attribute.PRIVATE: False,
                Attribute.ID: entry.object_id,
                Attribute.LABEL: _layout.cert_label(kid).decode(),
                Attribute.SUBJECT: subject,
                Attribute.ISSUER: issuer,
                Attribute.SERIAL_NUMBER: serial,
                Attribute.VALUE: der,
            })

        self._with_retry("certificate storage", write, self._locks.searches.exclusive)
        log.info("certificate stored", extra={"fields": {"token": self.name, "key_id": kid}})

    def lookup(self, kid: KeyID) -> KeyEntry | None:
        """Find one key this process has not seen (made by another daemon or
        worker) with a search by its ID. Misses are searched one at a time
        per token, so unknown IDs cannot pile up token scans; signing with
        known keys never waits for them. Raises Unavailable while the token
        is unusable: a key on a token that is away is not "not found"."""
        with self._miss_lock:
            entry = self._keys.get(kid)
            if entry is not None:
                return entry

            def find(s: Any) -> dict[KeyID, KeyEntry]:
                return self._read_keys(s, kid)

            found: dict[KeyID, KeyEntry] = self._with_retry("key lookup", find,
                                                            self._locks.searches.shared)
            entry = found.get(kid)
            if entry is not None:
                with self._lock:
                    self._keys[kid] = entry
            return entry

    def refresh(self) -> None:
        """Re-read the keys from the token (keys made by another daemon).

        The listing runs without the cache lock, which is taken only to swap
        the new cache in: a listing of a large token takes seconds, and a
        thread listing in a loop would otherwise starve every other writer of
        the cache (a key generation waiting to record its key hung a test).
        Keys this object made since the listing began are kept, and keys it
        deleted meanwhile stay deleted."""
        start = time.monotonic()

        def load(s: Any) -> dict[KeyID, KeyEntry]:
            return self._read_keys(s)

        keys: dict[KeyID, KeyEntry] = self._with_retry("key listing", load,
                                                       self._locks.searches.shared)
        with self._lock:
            for kid, made in list(self._made.items()):
                if made < start:
                    del self._made[kid]
                elif kid in self._keys:
                    keys.setdefault(kid, self._keys[kid])
            for kid, gone in list(self._gone.items()):
                if gone >= start:
                    keys.pop(kid, None)  # deleted here while the listing ran
                else:
                    del self._gone[kid]
            for kid, entry in keys.items():  # marked used here while the listing ran
                cached = self._keys.get(kid)
                if cached is not None and cached.used and not entry.used:
                    keys[kid] = replace(entry, used=True)
            self._keys = keys

    def sign(self, kid: KeyID, mechanism: _p11.Mechanism, data: bytes, max_len: int) -> bytes:
        """Sign ``data`` with the cached handle of key ``kid`` on a pooled session."""
        if kid not in self._keys and self.lookup(kid) is None:
            raise NotFound(f"no key {kid} on token {self.name}")

        def sign(s: Any) -> bytes:
            entry = self._keys.get(kid)
            if entry is None:
                raise NotFound(f"key {kid} is no longer on token {self.name}")
            return self.module.sign(s.handle, entry.handle, mechanism, data, max_len)

        result: bytes = self._with_retry("signing", sign, self._locks.signing.shared)
        return result


class _Collision(Exception):
    """Another process took the CKA_ID of a key being generated."""
