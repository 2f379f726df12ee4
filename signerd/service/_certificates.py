"""Certificates of the keys on signerd's tokens: a key's own certificate,
its chain up to a self-signed root (found through authorityKeyIdentifier, on
any token), and issuing one (certify). Plain Python, no gRPC;
:class:`signerd.service.KeyService` delegates here. The X.509 building blocks
(names, extensions, profiles, TBS encoding) are in :mod:`signerd.certs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signerd import certs, signing
from signerd.errors import FailedPrecondition, Unavailable
from signerd.keys import RAW, KeyID
from signerd.token import KeyEntry, Token

# The key service's logger: these are its messages, and log lines name it.
log = logging.getLogger("signerd.service")


@dataclass(frozen=True)
class Certified:
    """A key just certified: its chain (DER, leaf first, ending with a
    self-signed root) and the hex SHA-256 of the TBSCertificate its issuer
    signed (for the audit log)."""

    chain: list[bytes]
    tbs_sha256: str


class KeyCertificates:
    """The certificates of keys on ``tokens`` (by name; the key service's
    own mapping). ``refresh()`` re-reads the tokens' key listings (rate
    limited by its owner); ``sign(entry, data, options)`` signs on the token
    and returns the encoded signature, so that certify's signature is made
    like every other one (:meth:`signerd.service.KeyService.sign_with`)."""

    def __init__(self, tokens: Mapping[str, Token], refresh: Callable[[], None],
                 sign: Callable[[KeyEntry, bytes, signing.SignOptions], bytes]) -> None:
        self._tokens = tokens
        self._refresh = refresh
        self._sign = sign
        self._key_identifiers: dict[KeyID, bytes] = {}  # RFC 5280 key identifiers, by key ID

    def certificate(self, entry: KeyEntry) -> x509.Certificate:
        """Key ``entry``'s X.509 certificate, from its token.

        Only a certificate holding the key's own public key counts; if the
        token holds several, the one that starts last.

        Raises FailedPrecondition (none, or none for this public key),
        Unavailable."""
        found = []
        for der in self._tokens[entry.token].certificates(entry.key_id):
            try:
                cert = certs.load(der)
                if certs.spki_of(cert) == entry.spki_der:
                    found.append(cert)
                    continue
            except ValueError:
                pass
            log.warning("ignoring a certificate object that is not the key's", extra={
                "fields": {"token": entry.token, "key_id": entry.key_id}})
        if not found:
            raise FailedPrecondition(
                f"key {entry.key_id} has no certificate on token {entry.token}; "
                + _how_to_certify(entry))
        return max(found, key=lambda c: c.not_valid_before_utc)

    def _key_identifier(self, entry: KeyEntry) -> bytes:
        kid = self._key_identifiers.get(entry.key_id)
        if kid is None:
            kid = self._key_identifiers[entry.key_id] = certs.key_identifier(entry.spki_der)
        return kid

    def _issuer_key(self, cert: x509.Certificate, of: KeyEntry) -> KeyEntry:
        """The key whose RFC 5280 key identifier ``cert``'s
        authorityKeyIdentifier names, on any token. Raises FailedPrecondition."""
        wanted = certs.authority_key_id(cert)
        if wanted is None:
            raise FailedPrecondition(
                f"the certificate of key {of.key_id} has no authorityKeyIdentifier, so its "
                "issuer cannot be found; certify the key again with signerctl")
        for attempt in (0, 1):
            if attempt:
                self._refresh()  # made by another daemon since we listed?
            for t in self._tokens.values():
                for k in t.keys():
                    if self._key_identifier(k) == wanted:
                        return k
        raise FailedPrecondition(
            f"the issuer of key {of.key_id}'s certificate ({cert.issuer.rfc4514_string()}) "
            "is not a key on signerd's tokens")

    def certificate_chain(self, entry: KeyEntry) -> list[bytes]:
        """Key ``entry``'s certificate chain, DER, leaf first: its own
        certificate, then each issuer key's certificate (found through the
        authorityKeyIdentifier, on any token), up to a self-signed one.
        Every link is checked: the issuer's subject names the certificate's
        issuer and its key signed it.

        Raises FailedPrecondition (a certificate missing on the way, a broken
        link, a loop, more than certs.MAX_CHAIN certificates), Unavailable."""
        chain = [self.certificate(entry)]
        seen = {entry.key_id}
        current = entry
        while not certs.self_signed(chain[-1]):
            if len(chain) == certs.MAX_CHAIN:
                raise FailedPrecondition(
                    f"the chain of key {entry.key_id} is longer than {certs.MAX_CHAIN} "
                    "certificates")
            issuer = self._issuer_key(chain[-1], current)
            if issuer.key_id in seen:
                raise FailedPrecondition(
                    f"the chain of key {entry.key_id} loops back to key {issuer.key_id}")
            try:
                cert = self.certificate(issuer)
            except FailedPrecondition:
                raise FailedPrecondition(
                    f"the chain of key {entry.key_id} is incomplete: its issuer key "
                    f"{issuer.key_id} (on token {issuer.token}) has no certificate") from None
            if not certs.issued_by(chain[-1], cert):
                raise FailedPrecondition(
                    f"the certificate of key {current.key_id} was not issued by the current "
                    f"certificate of key {issuer.key_id} ({cert.subject.rfc4514_string()}): "
                    f"certify key {current.key_id} again")
            chain.append(cert)
            seen.add(issuer.key_id)
            current = issuer
        return [c.public_bytes(serialization.Encoding.DER) for c in chain]

    def certify(self, subject: KeyEntry, issuer: KeyEntry, subject_name: str,
                days: int = 0, profile: certs.Profile | None = None) -> Certified:
        """Issue an X.509 certificate for key ``subject``, signed on the
        token by key ``issuer`` (``subject`` itself: self-signed), and store
        it on ``subject``'s token, replacing its certificate.

        ``subject_name``: RFC 4514 (``"CN=acme signer,O=Acme,C=US"``);
        ``days``: validity, 0 for the profile's default (certs.CA_DAYS or
        certs.LEAF_DAYS); ``profile``: None means a CA when self-signed, a
        code-signing leaf otherwise. The issuer must have a CA certificate on
        its token; its subject becomes the new certificate's issuer.

        Raises InvalidArgument (subject, days), FailedPrecondition (the
        issuer has no CA certificate, the token refuses the object),
        Unavailable. Policy is the caller's business."""
        self_signed = issuer.key_id == subject.key_id
        profile = profile or (certs.Profile.CA if self_signed else certs.Profile.CODE_SIGNING)
        name = certs.parse_subject(subject_name)
        days = certs.validity_days(days, profile)
        if self_signed:
            issuer_name = name
        else:
            try:
                issuer_cert = self.certificate(issuer)
            except FailedPrecondition:
                raise FailedPrecondition(
                    f"issuer key {issuer.key_id} has no certificate on token {issuer.token}: "
                    "make it a CA first: " + _how_to_certify(issuer, ca=True)) from None
            certs.check_issuer(issuer_cert, issuer.key_id, profile)
            issuer_name = issuer_cert.subject
        how = certs.signing_for(issuer.algorithm)
        tbs = certs.build_tbs(subject_spki=subject.spki_der, subject=name,
                              issuer_spki=issuer.spki_der, issuer=issuer_name, profile=profile,
                              days=days, algorithm=how)
        signature = self._sign(issuer, tbs.dump(), how.options)
        built = certs.assemble(tbs, how, signature)
        cert = certs.load(built.der)
        if not certs.issued_by(cert, cert if self_signed else issuer_cert):
            # The token signed something else: never store it.
            raise Unavailable(f"token {issuer.token} returned a signature that does not "
                              f"verify with key {issuer.key_id}")
        self._tokens[subject.token].store_certificate(subject.key_id, built.der, built.subject,
                                                     built.issuer, built.serial)
        log.info("key certified", extra={"fields": {
            "key_id": subject.key_id, "issuer": issuer.key_id, "profile": profile.value,
            "subject": cert.subject.rfc4514_string(), "days": days}})
        return Certified(self.certificate_chain(subject), built.tbs_sha256)


def _how_to_certify(entry: KeyEntry, ca: bool = False) -> str:
    """The hint for a key with no certificate: certify it, or, for a metadata key (which
    signs only its own root certificate: signerd.service._guard), make it raw first."""
    command = (f"'signerctl keys certify {entry.key_id} --subject CN=...'"
               + ("" if ca else " (with --issuer-key CA_KEYID for a code-signing certificate)"))
    if entry.purpose == RAW:
        return "issue one with " + command
    return (f"it is a metadata key, and certificates are a raw key's job: 'signerctl keys "
            f"set-purpose {entry.key_id} raw' (if it signs no TUF or Notary metadata), "
            f"then {command}; or create a key with --purpose raw")
