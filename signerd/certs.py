"""X.509 certificates for token keys, signed on the token (``signerctl keys certify``).

No private key object exists outside the token, so ``cryptography``'s
CertificateBuilder (which signs with a key object) cannot be used: the
TBSCertificate is assembled here with asn1crypto, the issuer key signs its
DER on the token (:meth:`signerd.service.KeyService.sign_with`), and the
signature is wrapped into the Certificate (RFC 5280 §4.1), as
:mod:`signerd.trust.x509` does for Notary's root certificates.

The certificates meet the Notary Project's "Certificate Requirements"
(notaryproject/specifications ``specs/signature-specification.md``):

- a CA (``ca``; a self-signed root by default): basicConstraints critical,
  cA true, no pathLenConstraint; keyUsage critical, keyCertSign and cRLSign.
- a code-signing leaf (``code-signing``; by default when another key
  issues): basicConstraints critical, cA false; keyUsage critical,
  digitalSignature only; extendedKeyUsage (not critical) id-kp-codeSigning
  only. A self-signed code-signing certificate is a chain of one, which that
  specification allows ("Other requirements" 1).
- subjectKeyIdentifier and authorityKeyIdentifier (RFC 5280 §4.2.1.1-2,
  method 1: SHA-1 of the subjectPublicKey bits): the chain is followed from
  a certificate's authorityKeyIdentifier to the key on the tokens whose
  identifier it is.
- signed with ecdsa-with-SHA256 (P-256), ecdsa-with-SHA384 (P-384),
  sha256WithRSAEncryption (RSA, PKCS#1 v1.5) or Ed25519 (RFC 8410): never
  SHA-1.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from enum import Enum

from asn1crypto import algos, core
from asn1crypto import keys as asn1keys
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signerd import signing
from signerd.errors import FailedPrecondition, InvalidArgument, quoted
from signerd.keys import Algorithm, load_public_key

CA_DAYS = 3650  # default validity of a CA certificate
LEAF_DAYS = 365  # default validity of a code-signing certificate
MAX_DAYS = 36500
MAX_SUBJECT_BYTES = 1024  # DER Name
CLOCK_SKEW = dt.timedelta(minutes=5)  # notBefore is this far in the past
MAX_CHAIN = 8  # certificates in a chain, leaf and root included
_SERIAL_BITS = 159  # positive, at most 20 octets (RFC 5280 §4.1.2.2)
# RFC 4514 names cryptography knows, plus "S", which Notation's trust policy
# accepts for ST (specs/trust-store-trust-policy.md).
_NAME_OVERRIDES = {"S": NameOID.STATE_OR_PROVINCE_NAME}


class Profile(Enum):
    """What a certificate is for."""

    CA = "ca"
    CODE_SIGNING = "code-signing"


@dataclass(frozen=True)
class Signing:
    """How an issuer key signs a TBSCertificate: the AlgorithmIdentifier the
    certificate names, and the options signerd signs the DER with."""

    algorithm: algos.SignedDigestAlgorithm
    options: signing.SignOptions


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 distinguished name such as ``"CN=app signer,O=Acme,C=US"``.

    Raises InvalidArgument when it is empty, malformed or too long.
    """
    if not text.strip():
        raise InvalidArgument(
            "subject is required, e.g. 'CN=acme signer,O=Acme,ST=WA,C=US' (RFC 4514)")
    try:
        name = x509.Name.from_rfc4514_string(text, _NAME_OVERRIDES)
        der = name.public_bytes()
    except ValueError as e:
        why = f": {e}" if str(e) else ""
        raise InvalidArgument(
            f"invalid subject {quoted(text)}{why}; use RFC 4514, e.g. 'CN=acme signer,O=Acme,C=US'"
        ) from None
    if not len(name):
        raise InvalidArgument(f"subject {quoted(text)} names no attribute")
    if len(der) > MAX_SUBJECT_BYTES:
        raise InvalidArgument(f"subject is {len(der)} bytes DER; at most {MAX_SUBJECT_BYTES}")
    return name


def validity_days(days: int, profile: Profile) -> int:
    """``days``, or the profile's default when 0. Raises InvalidArgument."""
    if days == 0:
        return CA_DAYS if profile is Profile.CA else LEAF_DAYS
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"validity must be between 1 and {MAX_DAYS} days, got {days}")
    return days


def key_identifier(spki_der: bytes) -> bytes:
    """RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING
    of a DER SubjectPublicKeyInfo (20 bytes). An identifier, not a security
    function."""
    return x509.SubjectKeyIdentifier.from_public_key(load_public_key(spki_der)).digest


def signing_for(alg: Algorithm) -> Signing:
    """How a key of ``alg`` signs certificates (see the module docstring)."""
    if alg.keytype == "ecdsa":
        # The whole TBS is hashed with the key's hash: SHA-256, SHA-384 for P-384.
        oid = "sha384_ecdsa" if alg.hash_name == "sha384" else "sha256_ecdsa"
        return Signing(algos.SignedDigestAlgorithm({"algorithm": oid}),
                       signing.SignOptions(encoding=signing.Encoding.DER))
    if alg.keytype == "rsa":
        return Signing(
            algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()}),
            signing.SignOptions(rsa_padding=signing.RsaPadding.PKCS1V15))
    return Signing(algos.SignedDigestAlgorithm({"algorithm": "ed25519"}), signing.SignOptions())


def _time(when: dt.datetime) -> asn1x509.Time:
    # RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    when = when.astimezone(dt.UTC).replace(microsecond=0)
    return asn1x509.Time({"utc_time" if when.year < 2050 else "general_time": when})


def build_tbs(*, subject_spki: bytes, subject: x509.Name, issuer_spki: bytes,
              issuer: x509.Name, profile: Profile, days: int, algorithm: Signing,
              now: dt.datetime | None = None) -> asn1x509.TbsCertificate:
    """The TBSCertificate of a new certificate (RFC 5280 §4.1.2), ready to sign.

    ``subject_spki``/``issuer_spki``: DER SubjectPublicKeyInfo of the key
    being certified and of the key that signs; ``days``: validity from
    ``now`` (default: the current time) minus :data:`CLOCK_SKEW`. The serial
    number is 159 random bits.
    """
    start = (now or dt.datetime.now(dt.UTC)) - CLOCK_SKEW
    ca = profile is Profile.CA
    extensions: list[dict[str, object]] = [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": ca}},
        {"extn_id": "key_usage", "critical": True, "extn_value": asn1x509.KeyUsage(
            {"key_cert_sign", "crl_sign"} if ca else {"digital_signature"})},
    ]
    if not ca:
        extensions.append({"extn_id": "extended_key_usage", "critical": False,
                           "extn_value": ["code_signing"]})
    extensions += [
        {"extn_id": "key_identifier", "critical": False,
         "extn_value": key_identifier(subject_spki)},
        {"extn_id": "authority_key_identifier", "critical": False,
         "extn_value": {"key_identifier": key_identifier(issuer_spki)}},
    ]
    return asn1x509.TbsCertificate({
        "version": "v3",
        "serial_number": secrets.randbelow(2**_SERIAL_BITS - 1) + 1,
        "signature": algorithm.algorithm,
        "issuer": asn1x509.Name.load(issuer.public_bytes()),
        "validity": {"not_before": _time(start),
                     "not_after": _time(start + dt.timedelta(days=days))},
        "subject": asn1x509.Name.load(subject.public_bytes()),
        "subject_public_key_info": asn1keys.PublicKeyInfo.load(subject_spki),
        "extensions": extensions,
    })


@dataclass(frozen=True)
class Built:
    """A signed certificate and what a token's certificate object records of it."""

    der: bytes
    subject: bytes  # DER Name: CKA_SUBJECT
    issuer: bytes  # DER Name: CKA_ISSUER
    serial: bytes  # DER INTEGER: CKA_SERIAL_NUMBER
    tbs_sha256: str  # hex SHA-256 of the DER TBSCertificate the issuer signed


def assemble(tbs: asn1x509.TbsCertificate, algorithm: Signing, signature: bytes) -> Built:
    """Wrap ``signature`` (over ``tbs.dump()``, in X.509's encoding: DER
    Ecdsa-Sig-Value for ECDSA) into a Certificate."""
    cert = asn1x509.Certificate({"tbs_certificate": tbs,
                                 "signature_algorithm": algorithm.algorithm,
                                 "signature_value": signature})
    return Built(cert.dump(), tbs["subject"].dump(), tbs["issuer"].dump(),
                 tbs["serial_number"].dump(), hashlib.sha256(tbs.dump()).hexdigest())


def load(der: bytes) -> x509.Certificate:
    """A DER certificate, parsed. Raises ValueError."""
    return x509.load_der_x509_certificate(der)


def spki_of(cert: x509.Certificate) -> bytes:
    """The certificate's DER SubjectPublicKeyInfo."""
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s subject names ``cert``'s issuer and its key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def self_signed(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is its own issuer (a root, or a chain of one)."""
    return issued_by(cert, cert)


def authority_key_id(cert: x509.Certificate) -> bytes | None:
    """The keyIdentifier of the certificate's authorityKeyIdentifier, if any."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def check_issuer(cert: x509.Certificate, key_id: str, profile: Profile) -> None:
    """Raise FailedPrecondition unless ``cert`` (key ``key_id``'s
    certificate) may issue a certificate of ``profile``: basicConstraints
    cA true, keyUsage keyCertSign, and room under its pathLenConstraint."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        bc, ku = None, None
    if bc is None or ku is None or not bc.ca or not ku.key_cert_sign:
        raise FailedPrecondition(
            f"issuer key {key_id} has a certificate that is not a CA "
            f"({cert.subject.rfc4514_string()}): certify it with --profile ca "
            "(a self-signed root: no --issuer-key)")
    if profile is Profile.CA and bc.path_length == 0:
        raise FailedPrecondition(
            f"issuer key {key_id}'s certificate has pathLenConstraint 0: it may issue "
            "code-signing certificates only, not CA certificates")


def code_signing_problems(cert: x509.Certificate) -> list[str]:
    """What keeps ``cert`` from being a Notary Project code-signing leaf
    (signature-specification.md, "Leaf Certificates"); empty when nothing."""
    problems = []
    ext = cert.extensions
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage)
        forbidden = (ku.value.key_encipherment or ku.value.data_encipherment
                     or ku.value.key_agreement or ku.value.key_cert_sign or ku.value.crl_sign)
        if not ku.critical or not ku.value.digital_signature or forbidden:
            problems.append("keyUsage must be critical, with digitalSignature and no "
                            "keyCertSign, cRLSign or encipherment")
    except x509.ExtensionNotFound:
        problems.append("no keyUsage extension")
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            problems.append("it is a CA certificate (basicConstraints cA true)")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        banned = {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, ExtendedKeyUsageOID.SERVER_AUTH,
                  ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION,
                  ExtendedKeyUsageOID.TIME_STAMPING}
        if banned & set(eku):
            problems.append("extendedKeyUsage names a purpose other than code signing")
    except x509.ExtensionNotFound:
        pass
    return problems
