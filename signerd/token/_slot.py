"""Where a configured token is and what it is: its slot, found in its
module by the configured URI, the token's profile and mechanisms, learnt at
the first connection, and the login on its sessions."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pkcs11

from signerd.errors import ConfigError, TokenLoginError
from signerd.token import _p11
from signerd.token._locks import _ObjectLocks
from signerd.token._modules import MODULES
from signerd.token._pool import SessionPool, check_budget
from signerd.token.profiles import PROFILES, MechanismInfo, Profile, detect, supported_algorithms

if TYPE_CHECKING:  # annotations only: signerd.config imports signerd.token.profiles
    from signerd.config import TokenConfig

log = logging.getLogger("signerd.token")


class Slot:
    """One configured token's slot, token facts and login.

    ``slot_id`` is -1, ``info`` None and ``algorithms`` empty until the first
    connection; ``profile`` is the configured one, or the detected one from
    then on. ``locks`` are the token's :class:`_ObjectLocks` in this process
    once connected. ``login_refused`` is set for good by a refused PIN or a
    session budget the profile does not allow: neither is ever retried.
    ``lib`` is None once the module is released (the token is closed).
    """

    def __init__(self, config: TokenConfig, pin: bytes, lib: _p11.ThreadSafeLib) -> None:
        self.config = config
        self.name = config.name
        self._pin = pin
        self.lib: _p11.ThreadSafeLib | None = lib
        self.module = lib.module
        self.token: Any = None  # python-pkcs11's Token, once found
        self.slot_id = -1
        self.info: _p11.TokenInfo | None = None
        self.profile: Profile = PROFILES[config.profile or "generic"]
        self.algorithms: tuple[str, ...] = ()
        self.locks = _ObjectLocks()  # replaced by the token's own in open()
        self.login_refused = False

    def _find(self) -> Any | None:
        """The python-pkcs11 Token matching the configured URI, or None."""
        uri = self.config.uri
        assert self.lib is not None
        for slot in self.lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            tok = slot.get_token()
            if uri.token is not None and tok.label != uri.token:
                continue
            if uri.serial is not None and tok.serial.decode().strip() != uri.serial:
                continue
            return tok
        return None

    def _learn(self, info: _p11.TokenInfo) -> None:
        """At the first connection: the token's profile and capabilities.
        Raises ConfigError (a pool the profile's session budget refuses)."""
        if self.info is not None:
            return
        if self.config.profile is None:
            self.profile = detect(self.config.module, info.manufacturer)
        try:
            check_budget(self.name, self.profile, self.config.sessions, self.config.processes)
        except ConfigError:
            self.login_refused = True  # a config fault: never retried
            raise
        slot = self.token.slot
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

    def open(self, pool: SessionPool) -> Any | None:
        """Find the token, learn it (the first time), open the pool's sessions
        into ``pool`` (not lent yet: see :meth:`SessionPool.fill`) and log in
        once, on the first. Returns that first session, or None when no
        token in the module matches the URI.

        Raises TokenLoginError (a refused PIN: never retried, since SoftHSM
        never locks a PIN and a retry loop would be an unlimited guessing
        oracle), ConfigError (see :meth:`_learn`), P11Error or
        python-pkcs11's PKCS11Error."""
        found = self._find()
        if found is None:
            return None
        self.token = found
        self.slot_id = self.token.slot.slot_id
        self._learn(self.module.token_info(self.slot_id))
        self.locks = MODULES.object_locks(self.config.module, self.slot_id)
        first = self.token.open(rw=True)
        pool.add(first)
        try:
            self.module.login(first.handle, self._pin)
        except _p11.P11Error as e:
            if e.rv in (_p11.CKR_PIN_INCORRECT, _p11.CKR_PIN_LOCKED):
                self.login_refused = True
                raise TokenLoginError(
                    f"token {self.name}: login refused ({_p11.rv_name(e.rv)}); "
                    "check the PIN file or environment variable"
                ) from None
            raise
        for _ in range(self.config.sessions - 1):
            pool.add(self.token.open(rw=True))
        return first
