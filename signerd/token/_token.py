"""The Token façade: one configured token, composed of its pieces."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from signerd.keys import Algorithm, KeyID
from signerd.token import _p11
from signerd.token._certificates import Certificates
from signerd.token._health import Health
from signerd.token._keystore import KeyStore
from signerd.token._listing import KeyEntry
from signerd.token._modules import MODULES
from signerd.token._pool import SessionPool
from signerd.token._slot import Slot
from signerd.token._sweep import Junk
from signerd.token.profiles import Profile

if TYPE_CHECKING:  # annotations only: signerd.config imports signerd.token.profiles
    from signerd.config import TokenConfig

log = logging.getLogger("signerd.token")

_CLOSE_WAIT = 30.0  # seconds close() waits for sessions in use to come back


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
    """One configured token: its login, session pool, key index and health.

    A façade over :class:`Slot` (where the token is, what it is, the
    login), :class:`SessionPool`, :class:`Health` (probe, reconnects,
    retries), :class:`KeyStore` (the key index and key operations) and
    :class:`Certificates`; :data:`MODULES` knows it as a user of its module.

    Raises, when opened: :class:`TokenLoginError` for a refused PIN,
    :class:`ConfigError` for a module that cannot be loaded or a session
    budget the token's profile does not allow, :class:`Unavailable` for a
    token that cannot be reached (tried again by the caller),
    :class:`ResourceExhausted` for a device whose sessions stay taken
    (:meth:`Health.open`)."""

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.name = config.name
        pin = config.read_pin().encode()
        # Made before MODULES knows this token: a re-initialisation of the
        # module may ask any of its users whether it is connected.
        self._lock = threading.RLock()  # guards reconnects and the key index's writers
        self._pool = SessionPool(self.name)
        self._slot = Slot(config, pin, MODULES.acquire(config.module, self))
        self._health = Health(self._slot, self._pool, self._lock, self, self._load_keys)
        self._keys = KeyStore(self._slot, self._health, self._lock)
        self._certificates = Certificates(self._slot, self._health, self._keys)
        try:
            self._health.open()
        except BaseException:
            self.close()
            raise
        self._keys.start_listing()

    def _load_keys(self, session: Any) -> None:
        self._keys.load(session)

    # -- what the token is ----------------------------------------------------

    @property
    def module(self) -> _p11.Module:
        """The token's PKCS#11 module (ctypes calls)."""
        return self._slot.module

    @property
    def slot_id(self) -> int:
        """The token's slot ID (-1 before the first connection)."""
        return self._slot.slot_id

    @property
    def info(self) -> _p11.TokenInfo | None:
        """C_GetTokenInfo at the first connection."""
        return self._slot.info

    @property
    def profile(self) -> Profile:
        """The configured or detected profile."""
        return self._slot.profile

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Names of the algorithms the token can create keys of."""
        return self._slot.algorithms

    @algorithms.setter
    def algorithms(self, value: tuple[str, ...]) -> None:
        self._slot.algorithms = value

    def status(self) -> TokenStatus:
        """The token as ``signerctl tokens list`` shows it."""
        info, healthy = self.info, self._health.healthy
        return TokenStatus(
            name=self.name, module=self.config.module, profile=self.profile.name,
            manufacturer=info.manufacturer if info else "", model=info.model if info else "",
            serial=info.serial if info else "", label=info.label if info else "",
            healthy=healthy, error="" if healthy else self._health.last_error,
            algorithms=self.algorithms, key_count=self._keys.count,
            sessions=self.config.sessions,
            free_public_memory=info.free_public_memory if info else None,
            free_private_memory=info.free_private_memory if info else None,
        )

    # -- sessions and health --------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the token answered its last probe or operation."""
        return self._health.healthy

    @property
    def connected(self) -> bool:
        """Whether the pooled sessions may be used (else borrowers reconnect)."""
        return self._pool.connected

    @property
    def sessions_in_use(self) -> int:
        """Pooled sessions borrowed now."""
        return self._pool.in_use

    @property
    def session_idle(self) -> bool:
        """Whether a pooled session is free now (so borrowing one would not
        wait, unless another thread takes it first)."""
        return self._pool.has_idle

    @contextmanager
    def session(self) -> Iterator[tuple[int, Any]]:
        """Borrow a pooled session: (generation, python-pkcs11 session)."""
        if not self._pool.connected:
            self._health.reconnect()
        with self._pool.borrow() as borrowed:
            yield borrowed

    def check(self) -> bool:
        """Health probe (:meth:`Health.check`); True if the token is usable."""
        return self._health.check()

    def reconnect(self, seen_generation: int | None = None, probe: bool = False) -> None:
        """Re-open sessions and log in again (:meth:`Health.reconnect`)."""
        self._health.reconnect(seen_generation, probe)

    def forget_sessions(self) -> None:
        """Discard sessions without closing them (the module is being finalised)."""
        self._pool.forget()

    def pause(self, timeout: float) -> bool:
        """Hold reconnects for a module re-initialisation (:meth:`Health.pause`)."""
        return self._health.pause(timeout)

    def resume(self) -> None:
        """End a :meth:`pause`."""
        self._health.resume()

    def close(self) -> None:
        """Log out (unless another Token of this process shares the login),
        close the sessions and release the module; never reconnects again."""
        self._keys.join_listing()  # its session must not close under it
        with self._lock:
            # From here on, nothing logs in again: a late health probe or
            # request would otherwise reconnect a token that is being closed.
            self._health.closed = True
        # Nor may a session in use: closing it, or finalising the module, under
        # a thread still inside C_Sign is undefined behaviour in the module.
        if not self._pool.wait_idle(_CLOSE_WAIT):
            log.warning("closing a token with sessions still in use",
                        extra={"fields": {"token": self.name, "in_use": self._pool.in_use}})
        with self._lock:
            # The login belongs to the token, not to this object: another Token
            # of this process on the same token would be logged out with it.
            if self._pool.sessions and not MODULES.shares_login(self):
                self.module.logout(self._pool.sessions[0].handle)
            self._pool.close_all()
            self._health.healthy = False
            if self._slot.lib is not None:
                MODULES.release(self.config.module, self)
                self._slot.lib = None

    # -- keys (KeyStore) and certificates -------------------------------------

    def keys(self) -> list[KeyEntry]:
        """Every key on the token (waits for the first listing to finish)."""
        return self._keys.keys()

    def get(self, kid: KeyID) -> KeyEntry | None:
        """The indexed key ``kid``, or None (no search on the token)."""
        return self._keys.get(kid)

    def known_keys(self) -> list[KeyEntry]:
        """The keys listed so far (does not wait for the first listing)."""
        return self._keys.known_keys()

    @property
    def listed(self) -> bool:
        """Whether the key index holds a whole listing (:attr:`KeyStore.listed`)."""
        return self._keys.listed

    def lookup(self, kid: KeyID, wait_listing: bool = True) -> KeyEntry | None:
        """Find a key this process has not seen by its ID (:meth:`KeyStore.lookup`)."""
        return self._keys.lookup(kid, wait_listing)

    def refresh(self) -> None:
        """Re-read the keys from the token (:meth:`KeyStore.refresh`)."""
        self._keys.refresh()

    def sweep(self, remove: bool = False, grace: float = 2.0) -> tuple[list[Junk], int]:
        """Objects that belong to no key, and how many were removed
        (:meth:`KeyStore.sweep`)."""
        return self._keys.sweep(remove, grace)

    def report_junk(self) -> None:
        """Log the objects that belong to no key (the start-up sweep)."""
        self._keys.report_junk()

    def check_algorithm(self, alg: Algorithm) -> None:
        """Raise FailedPrecondition unless the token can create ``alg`` keys."""
        self._keys.check_algorithm(alg)

    def generate(self, alg: Algorithm, gun: str, role: str, purpose: str = "metadata") -> KeyEntry:
        """Generate a key pair (:meth:`KeyStore.generate`)."""
        return self._keys.generate(alg, gun, role, purpose)

    def set_purpose(self, kid: KeyID, purpose: str) -> KeyEntry:
        """Record key ``kid``'s new purpose (:meth:`KeyStore.set_purpose`)."""
        return self._keys.set_purpose(kid, purpose)

    def delete(self, kid: KeyID) -> None:
        """Destroy key ``kid``'s objects (:meth:`KeyStore.delete`)."""
        self._keys.delete(kid)

    def mark_used(self, kid: KeyID) -> None:
        """Record that key ``kid`` has signed (:meth:`KeyStore.mark_used`)."""
        self._keys.mark_used(kid)

    def sign(self, kid: KeyID, mechanism: _p11.Mechanism, data: bytes, max_len: int) -> bytes:
        """Sign ``data`` with key ``kid`` on a pooled session (:meth:`KeyStore.sign`)."""
        return self._keys.sign(kid, mechanism, data, max_len)

    def certificates(self, kid: KeyID) -> list[bytes]:
        """Key ``kid``'s DER X.509 certificates (:meth:`Certificates.read`)."""
        return self._certificates.read(kid)

    def store_certificate(self, kid: KeyID, der: bytes, subject: bytes, issuer: bytes,
                          serial: bytes) -> None:
        """Store key ``kid``'s certificate (:meth:`Certificates.store`)."""
        self._certificates.store(kid, der, subject, issuer, serial)

    # -- for tests and bench/ (which reach into the pool) ---------------------

    def wait_retired(self, timeout: float = 10.0) -> bool:
        """Wait until the objects superseded by a key's first signature are
        destroyed (:mod:`signerd.token._retire`); True if they are."""
        return self._keys.wait_retired(timeout)

    @property
    def _generation(self) -> int:
        return self._pool.generation

    @property
    def _sessions(self) -> list[Any]:
        return self._pool.sessions

    @property
    def _touched(self) -> dict[int, float]:
        return self._pool.touched

    @_touched.setter
    def _touched(self, value: dict[int, float]) -> None:
        self._pool.touched = value
