"""The root key's self-signed certificate, built without a private key object.

Notary puts the root key into root.json as an ``ecdsa-x509``/``rsa-x509`` key
whose public value is a PEM certificate (cryptoservice/certificate.go,
tuf/utils/x509.go NewCertificate). The key lives on a token, so the
TBSCertificate is assembled here with asn1crypto and its DER is handed to
``signer.sign``.
"""

from __future__ import annotations

import base64
import re
import secrets
from datetime import UTC, datetime, timedelta

from asn1crypto import algos, core
from asn1crypto import keys as asn1keys
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from signerd.errors import InvalidArgument, quoted
from signerd.trust._key import MIN_RSA_BITS, TufKey
from signerd.trust.errors import VerificationError
from signerd.trust.metadata import YEAR
from signerd.trust.signer import PSS_SALT_LENGTH, Pkcs1v15Signer, TrustSigner

CERT_VALIDITY = 10 * YEAR  # notary: startTime.Add(notary.Year*10)
# notary accepts a certificate whose start is up to a day ahead (utils.ValidateCertificate)
NOT_BEFORE_LEEWAY = timedelta(days=1)


def _time(when: datetime) -> asn1x509.Time:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (Go does the same).
    when = when.astimezone(UTC).replace(microsecond=0)
    return asn1x509.Time({"utc_time" if when.year < 2050 else "general_time": when})


def _signature_algorithm(signer: TrustSigner) -> algos.SignedDigestAlgorithm:
    if signer.keytype == "ecdsa":
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
    if signer.keytype == "rsa" and isinstance(signer, Pkcs1v15Signer):
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()})
    if signer.keytype == "rsa":
        # Plain TrustSigners sign RSA with PSS; Go's x509 accepts these parameters
        # (MGF1 hash = message hash, salt = hash size, trailer 1).
        params = algos.RSASSAPSSParams(
            {
                "hash_algorithm": {"algorithm": "sha256", "parameters": core.Null()},
                "mask_gen_algorithm": {
                    "algorithm": "mgf1",
                    "parameters": {"algorithm": "sha256", "parameters": core.Null()},
                },
                "salt_length": PSS_SALT_LENGTH,
            }
        )
        return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
    raise InvalidArgument(
        f"a Notary root key must be ecdsa or rsa (x509 certificates), not {signer.keytype}"
    )


def build_root_certificate(
    signer: TrustSigner,
    gun: str,
    *,
    not_before: datetime | None = None,
    validity: timedelta = CERT_VALIDITY,
    serial: int | None = None,
) -> bytes:
    """Return a PEM certificate for the root key: self-signed with ``signer``, CN = ``gun``.

    Matches notary's NewCertificate template: random positive serial below
    2**128, KeyUsage digitalSignature+keyEncipherment (critical), ExtKeyUsage
    codeSigning, BasicConstraints CA:false (critical). ECDSA certificates use
    ecdsa-with-SHA256; RSA ones use sha256WithRSAEncryption when the signer
    offers ``sign_pkcs1v15`` and RSASSA-PSS otherwise.
    """
    algorithm = _signature_algorithm(signer)
    start = not_before or datetime.now(UTC)
    name = asn1x509.Name.build({"common_name": gun})
    tbs = asn1x509.TbsCertificate(
        {
            "version": "v3",
            "serial_number": serial if serial is not None else secrets.randbelow(2**128 - 1) + 1,
            "signature": algorithm,
            "issuer": name,
            "validity": {"not_before": _time(start), "not_after": _time(start + validity)},
            "subject": name,
            # ecdsa/rsa TUF public values are DER SPKI already
            "subject_public_key_info": asn1keys.PublicKeyInfo.load(signer.public),
            "extensions": [
                {
                    "extn_id": "key_usage",
                    "critical": True,
                    "extn_value": asn1x509.KeyUsage({"digital_signature", "key_encipherment"}),
                },
                {
                    "extn_id": "extended_key_usage",
                    "critical": False,
                    "extn_value": ["code_signing"],
                },
                {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": False}},
            ],
        }
    )
    tbs_der = tbs.dump()
    if signer.keytype == "ecdsa":
        raw = signer.sign(tbs_der)
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        sig = encode_dss_signature(r, s)  # X.509 wants DER Ecdsa-Sig-Value, TUF raw r||s
    elif isinstance(signer, Pkcs1v15Signer):
        sig = signer.sign_pkcs1v15(tbs_der)
    else:
        sig = signer.sign(tbs_der)
    cert = asn1x509.Certificate(
        {"tbs_certificate": tbs, "signature_algorithm": algorithm, "signature_value": sig}
    )
    return _pem(cert.dump())


def _pem(der: bytes) -> bytes:
    # Exactly Go's pem.EncodeToMemory: 64-column lines and a final newline.
    # Notary recomputes root key IDs from re-encoded PEM, so the bytes matter.
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def certificate_key(pem: bytes) -> TufKey:
    """The root.json key for a certificate: ``ecdsa-x509`` or ``rsa-x509``."""
    cert = _load(pem)
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return TufKey("ecdsa-x509", pem)
    if isinstance(public, rsa.RSAPublicKey):
        return TufKey("rsa-x509", pem)
    raise InvalidArgument("root certificates must hold an ECDSA or RSA key")


def x509_key_id(pem: bytes) -> str:
    """Key ID of the certificate's x509 key: the ID root.json and root signatures use."""
    return certificate_key(pem).key_id


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise InvalidArgument(f"not a PEM certificate: {e}") from None


# Go's x509 maps all of these to a SHA-1 signature algorithm (SHA1WithRSA,
# DSAWithSHA1, ECDSAWithSHA1); notary's ValidateCertificate refuses them.
_SHA1_SIGNATURES = frozenset(
    {
        "1.2.840.113549.1.1.5",  # sha1WithRSAEncryption
        "1.3.14.3.2.29",  # sha1WithRSASignature (the ISO OID Go also accepts)
        "1.2.840.10040.4.3",  # dsa-with-sha1
        "1.2.840.10045.4.1",  # ecdsa-with-SHA1
    }
)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([^-\r\n]*)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def _bad(reason: str) -> VerificationError:
    return VerificationError("root", f"invalid root certificate: {reason}")


def load_certificate_bundle(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (notary's LoadCertBundleFromPEM).

    A block that is not a CERTIFICATE, or a certificate that does not parse,
    makes the whole bundle invalid. Raises VerificationError for root.json.
    """
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise _bad("no PEM certificate found")
    certs = []
    for kind, _ in blocks:
        if kind != b"CERTIFICATE":
            raise _bad(f"invalid PEM block type {quoted(kind.decode(errors='replace'))}")
    for block in _PEM_BLOCK.finditer(pem):
        certs.append(_load(block.group(0)))
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    # Go's IsCA: a basicConstraints extension with cA true.
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def split_root_bundle(pem: bytes) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The leaf and the intermediates of a root key's bundle (notary's parseAllCerts).

    Exactly one certificate is not a CA, and it comes first; every other
    certificate is a CA, used as an intermediate.
    """
    certs = load_certificate_bundle(pem)
    leaves = [c for c in certs if not _is_ca(c)]
    if len(leaves) != 1:
        raise _bad(
            "the root key holds a CA certificate, not a leaf (notary accepts only a "
            "non-CA certificate as the root key)"
            if not leaves
            else f"the root key holds {len(leaves)} leaf certificates, notary allows one"
        )
    if _is_ca(certs[0]):
        raise _bad("the leaf certificate must come first, before its intermediates")
    return certs[0], certs[1:]


def validate_certificate(
    cert: x509.Certificate, *, now: datetime | None = None, check_expiry: bool = True
) -> None:
    """Notary's utils.ValidateCertificate; raises VerificationError for root.json.

    The validity window must not be inverted, the signature must not use
    SHA-1, RSA keys need 2048 bits, and with ``check_expiry`` the certificate
    must be valid now (its start may be up to a day ahead).
    """
    cn = _common_name(cert)
    if cert.not_valid_before_utc > cert.not_valid_after_utc:
        raise _bad(f"certificate of {cn!r} has an invalid validity window")
    algo = cert.signature_algorithm_oid.dotted_string
    pss_hash = cert.signature_algorithm_parameters
    if algo in _SHA1_SIGNATURES or (
        isinstance(pss_hash, padding.PSS) and isinstance(
            cert.signature_hash_algorithm, hashes.SHA1)
    ):
        raise _bad(f"certificate of {cn!r} uses a SHA-1 signature")
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise _bad(f"certificate of {cn!r} has an RSA key shorter than {MIN_RSA_BITS} bits")
    if check_expiry:
        at = now or datetime.now(UTC)
        if cert.not_valid_before_utc > at + NOT_BEFORE_LEEWAY or at > cert.not_valid_after_utc:
            raise _bad(f"certificate of {cn!r} expired or not valid yet")


def _common_name(cert: x509.Certificate) -> str:
    # Go's pkix.Name.FillFromRDNSequence keeps the last CN when there are several.
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[-1].value) if cns else ""


def match_cn_to_gun(cn: str, gun: str) -> bool:
    """notary's MatchCNToGun: equal, or a ``prefix*`` wildcard that the GUN starts with."""
    if cn.endswith("*"):
        return gun.startswith(cn.rstrip("*"))
    return cn == gun


def check_root_certificate(
    pem: bytes, gun: str, *, now: datetime | None = None, check_expiry: bool = True
) -> x509.Certificate:
    """Check a root key's certificate bundle as notary's trustpinning does; return the leaf.

    The bundle holds one leaf (non-CA) certificate first, then CA
    intermediates; the leaf's CN equals the GUN (or is a ``prefix*`` wildcard
    matching it) and it passes :func:`validate_certificate`. Raises
    VerificationError for root.json.
    """
    try:
        leaf, _ = split_root_bundle(pem)
        cn = _common_name(leaf)
        if not match_cn_to_gun(cn, gun):
            raise _bad(f"CN {cn!r} does not match GUN {gun!r}")
        validate_certificate(leaf, now=now, check_expiry=check_expiry)
        return leaf
    except VerificationError:
        raise
    except Exception as e:  # noqa: BLE001 - cryptography parses lazily: corrupt DER fails late
        # with ValueError, TypeError, DuplicateExtension and others, only when a field is read.
        raise _bad(f"{type(e).__name__}: {e}") from None


def root_certificate_key(
    key: TufKey, gun: str, *, now: datetime | None = None, check_expiry: bool = True
) -> TufKey:
    """The key notary verifies root signatures with (trustpinning, utils.CertsToKeys).

    The leaf is checked by :func:`check_root_certificate`; intermediates that
    fail :func:`validate_certificate` are dropped, as notary's
    validRootIntCerts does; the key is rebuilt from the re-encoded PEM of the
    leaf and the valid intermediates, and typed by the leaf's key, so its ID
    is the one notary computes.
    """
    leaf = check_root_certificate(key.public, gun, now=now, check_expiry=check_expiry)
    try:
        _, intermediates = split_root_bundle(key.public)
        kept = []
        for cert in intermediates:
            try:
                validate_certificate(cert, now=now, check_expiry=True)
            except VerificationError:
                continue
            kept.append(cert)
        pem = b"".join(_pem(c.public_bytes(serialization.Encoding.DER)) for c in [leaf, *kept])
        public = leaf.public_key()
    except Exception as e:  # noqa: BLE001 - as in check_root_certificate
        raise _bad(f"{type(e).__name__}: {e}") from None
    if isinstance(public, ec.EllipticCurvePublicKey):
        return TufKey("ecdsa-x509", pem)
    if isinstance(public, rsa.RSAPublicKey):
        return TufKey("rsa-x509", pem)
    raise _bad("root certificates must hold an ECDSA or RSA key")


def verify_self_signature(cert: x509.Certificate) -> None:
    """Raise InvalidSignature unless ``cert`` is signed by its own key.

    Notary itself does not check this; signerd's tests and ``inspect`` do.
    """
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        pad = cert.signature_algorithm_parameters
        if not isinstance(pad, padding.PSS | padding.PKCS1v15):
            raise InvalidSignature("unsupported RSA signature parameters")
        public.verify(cert.signature, cert.tbs_certificate_bytes, pad, hashes.SHA256())
    else:
        raise InvalidSignature("unsupported certificate key type")


__all__ = [
    "CERT_VALIDITY",
    "build_root_certificate",
    "certificate_key",
    "check_root_certificate",
    "root_certificate_key",
    "validate_certificate",
    "verify_self_signature",
    "x509_key_id",
]
