"""X.509 certificates of a token's keys: CKO_CERTIFICATE objects of type
CKC_X_509 with the key pair's CKA_ID (see :mod:`signerd.token._layout`)."""

from __future__ import annotations

import logging
from typing import Any

import pkcs11
from pkcs11 import Attribute, CertificateType, ObjectClass

from signerd.keys import KeyID
from signerd.token import _layout, _p11
from signerd.token._health import Health
from signerd.token._keygen import full
from signerd.token._keystore import KeyStore
from signerd.token._slot import Slot

log = logging.getLogger("signerd.token")


class Certificates:
    """Reads and stores the certificates of ``keys``' keys on one token."""

    def __init__(self, slot: Slot, health: Health, keys: KeyStore) -> None:
        self.name = slot.name
        self._slot = slot
        self._health = health
        self._keys = keys

    def read(self, kid: KeyID) -> list[bytes]:
        """The DER X.509 certificates stored for key ``kid``: the values of
        the CKO_CERTIFICATE objects of type CKC_X_509 with the key pair's
        CKA_ID (one, when only signerd writes them; see :mod:`signerd.token._layout`).
        Nothing is checked here: the caller compares each certificate's
        public key with the key's.

        Raises NotFound (no key ``kid`` on this token), Unavailable (the token
        does not answer: a token that went away answers searches with
        nothing, which is not "no certificate")."""
        entry = self._keys.known(kid)
        template = {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_CERTIFICATE),
                    _p11.CKA_ID: entry.object_id}

        x509_type = _p11.ulong(_p11.CKC_X_509)

        def read(s: Any) -> list[bytes]:
            m, h = self._slot.module, s.handle
            reader = m.attribute_reader({_p11.CKA_CERTIFICATE_TYPE: len(x509_type),
                                         _p11.CKA_VALUE: 2048})
            found = []
            for handle in m.find_objects(h, template):
                attrs = reader.read(h, handle)
                value = attrs[_p11.CKA_VALUE]
                if attrs[_p11.CKA_CERTIFICATE_TYPE] == x509_type and value:
                    found.append(value)
            if not self._health.answers(s):
                raise _p11.P11Error("C_GetTokenInfo", _p11.CKR_DEVICE_REMOVED)
            return found

        result: list[bytes] = self._health.run("certificate lookup", read,
                                               self._slot.locks.searches.shared)
        return result

    def store(self, kid: KeyID, der: bytes, subject: bytes, issuer: bytes,
              serial: bytes) -> None:
        """Store ``der`` (a DER X.509 certificate) as key ``kid``'s
        certificate, replacing the ones it had: a CKO_CERTIFICATE object of
        type CKC_X_509 with the key pair's CKA_ID, public, labelled by
        :func:`signerd.token._layout.cert_label`. ``subject`` and ``issuer`` are the
        certificate's DER Names and ``serial`` the DER INTEGER of its serial
        number, as CKA_SUBJECT, CKA_ISSUER and CKA_SERIAL_NUMBER hold them
        (PKCS#11 v2.40 §4.6.3).

        The new object is made before the old ones are destroyed, so that a
        crash in between leaves the key with a certificate (two: the reader
        takes the key's own that starts last); for a CA key a missing one would break every chain
        below it. A YubiHSM keeps one opaque object per ID, so there
        (:attr:`Profile.id_bytes` of 2) the old one must go first. Creating
        an object holds the searches lock alone (see _ObjectLocks).

        Raises NotFound, FailedPrecondition (the token refuses the template),
        ResourceExhausted (no room on the token), Unavailable."""
        entry = self._keys.known(kid)
        module = self._slot.module
        template = {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_CERTIFICATE),
                    _p11.CKA_ID: entry.object_id}
        replace_first = self._slot.profile.id_bytes <= 2

        def write(s: Any) -> None:
            self._keys.before_write(s)
            try:
                old = module.find_objects(s.handle, template)  # ends before any write
                if replace_first:
                    for handle in old:
                        module.destroy(s.handle, handle)
                try:
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
                except (pkcs11.PKCS11Error, _p11.P11Error) as e:
                    error = full(e, self.name, "a certificate")
                    if error is not None:
                        raise error from None
                    raise
                if not replace_first:
                    for handle in old:
                        module.destroy(s.handle, handle)
            finally:
                self._keys.after_write()

        self._health.run("certificate storage", write, self._slot.locks.searches.exclusive)
        log.info("certificate stored", extra={"fields": {"token": self.name, "key_id": kid}})
