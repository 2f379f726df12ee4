"""Ed25519 key generation, whose curve a module may want named one way or the other.

CKA_EC_PARAMS may name Ed25519 by its OID or as the PrintableString
"edwards25519" (PKCS#11 v3.0 §2.3.10), and modules take one or the other
(yubihsm_pkcs11 only the name). :class:`Ed25519Forms` remembers, per token,
the form that worked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pkcs11

from signerd.errors import FailedPrecondition
from signerd.keys import ALGORITHMS
from signerd.token import _keygen, _layout, _p11
from signerd.token._listing import KeyEntry
from signerd.token.profiles import ED25519_NAME

if TYPE_CHECKING:
    from signerd.token._slot import Slot

log = logging.getLogger("signerd.token")


class Ed25519Forms:
    """The CKA_EC_PARAMS form one token takes for Ed25519 keys, once known."""

    def __init__(self) -> None:
        self.params: bytes | None = None  # the form that worked, once known

    def generate(self, slot: Slot, s: Any, gun: str, role: str, purpose: str,
                 answers: Callable[[Any], bool]) -> KeyEntry | None:
        """An Ed25519 key pair on ``slot`` through session ``s``
        (:func:`_keygen.generate_pair`; None: its CKA_ID was taken). The
        profile's form is tried first, then the other once; if neither works
        and the token still ``answers(s)``, the token stops offering ed25519.
        Raises FailedPrecondition, and the module's error for a session or
        device that is lost (also one a token that has gone away gives as
        CKR_GENERAL_ERROR, as SoftHSM does: a token away is not a token that
        cannot make the key)."""
        alg = ALGORITHMS["ed25519"]
        forms = [self.params or slot.profile.ed25519_params]
        forms += [f for f in (_layout.CURVE_OIDS["ed25519"], ED25519_NAME) if f not in forms]
        if self.params is not None:
            forms = forms[:1]
        failure: Exception | None = None
        for params in forms:
            try:
                entry = _keygen.generate_pair(slot.module, slot.profile, slot.name, s, alg,
                                              gun, role, params, purpose)
            except (pkcs11.PKCS11Error, _p11.P11Error) as e:
                rv = _p11.failure_rv(e)
                if rv in _p11.SESSION_LOST | _p11.DEVICE_LOST | _p11.HANDLE_LOST:
                    raise
                failure = e
                continue
            self.params = params
            return entry
        if self.params is None and answers(s):  # neither form: it cannot make Ed25519 keys
            slot.algorithms = tuple(a for a in slot.algorithms if a != "ed25519")
            log.warning("token lists Ed25519 mechanisms but makes no Ed25519 key", extra={
                "fields": {"token": slot.name, "error": _p11.failure_name(failure or
                                                                          Exception())}})
            raise FailedPrecondition(
                f"token {slot.name} cannot create ed25519 keys "
                f"({_p11.failure_name(failure or Exception())}); it supports "
                f"{', '.join(slot.algorithms) or 'no algorithm signerd uses'}")
        assert failure is not None
        raise failure
