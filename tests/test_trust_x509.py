"""Root certificates: built without a private key object, checked with cryptography."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from signerd.errors import InvalidArgument
from signerd.trust import (
    SoftwareSigner,
    TrustSigner,
    VerificationError,
    build_root_certificate,
    certificate_key,
    check_root_certificate,
    x509_key_id,
)
from signerd.trust.x509 import verify_self_signature

GUN = "registry.example.com:5000/acme/app_1"


class PlainSigner:
    """A TrustSigner with no sign_pkcs1v15: RSA certificates must fall back to PSS."""

    def __init__(self, inner: SoftwareSigner) -> None:
        self._inner = inner
        self.key_id, self.keytype = inner.key_id, inner.keytype
        self.public, self.method = inner.public, inner.method

    def sign(self, message: bytes) -> bytes:
        return self._inner.sign(message)


def _signer(kind: str) -> TrustSigner:
    if kind == "ecdsa-p256":
        return SoftwareSigner.generate("ecdsa")
    if kind == "ecdsa-p384":
        return SoftwareSigner(ec.generate_private_key(ec.SECP384R1()))
    if kind == "rsa-pkcs1v15":
        return SoftwareSigner.generate("rsa")
    return PlainSigner(SoftwareSigner.generate("rsa"))


KINDS = {
    "ecdsa-p256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    "ecdsa-p384": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    "rsa-pkcs1v15": SignatureAlgorithmOID.RSA_WITH_SHA256,
    "rsa-pss": SignatureAlgorithmOID.RSASSA_PSS,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_certificate_passes_cryptography_checks(kind: str) -> None:
    signer = _signer(kind)
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    pem = build_root_certificate(signer, GUN, not_before=start)
    cert = x509.load_pem_x509_certificate(pem)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == GUN
    assert cert.issuer == cert.subject
    assert cert.signature_algorithm_oid == KINDS[kind]
    cert.verify_directly_issued_by(cert)  # self-signature, by cryptography itself
    verify_self_signature(cert)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + timedelta(days=3650)
    assert 0 < cert.serial_number < 2**128
    assert cert.version == x509.Version.v3

    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CODE_SIGNING]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False

    # The certificate holds exactly the signer's key.
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == signer.public
    # PEM exactly as Go's pem.EncodeToMemory (and cryptography) write it.
    assert pem == cert.public_bytes(serialization.Encoding.PEM)


def test_serials_are_random() -> None:
    signer = SoftwareSigner.generate()
    serials = {x509.load_pem_x509_certificate(build_root_certificate(signer, GUN)).serial_number
               for _ in range(5)}
    assert len(serials) == 5


def test_dates_from_2050_use_generalized_time() -> None:
    start = datetime(2045, 6, 1, tzinfo=UTC)
    cert = x509.load_pem_x509_certificate(
        build_root_certificate(SoftwareSigner.generate(), GUN, not_before=start))
    assert cert.not_valid_after_utc.year == 2055
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize(("kind", "keytype"),
                         [("ecdsa-p256", "ecdsa-x509"), ("rsa-pss", "rsa-x509")])
def test_x509_key_id_is_sha256_of_canonical_key(kind: str, keytype: str) -> None:
    signer = _signer(kind)
    pem = build_root_certificate(signer, GUN)
    # Written out by hand: {"keytype":…,"keyval":{"private":null,"public":base64(PEM)}}
    public = base64.b64encode(pem).decode()
    doc = {"keytype": keytype, "keyval": {"private": None, "public": public}}
    expected = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    assert x509_key_id(pem) == expected.hexdigest()
    key = certificate_key(pem)
    assert key.keytype == keytype
    # The canonical ID is the bare key's, which is what the signer reports.
    assert key.canonical_id == signer.key_id != key.key_id


def test_ed25519_cannot_be_a_root_key() -> None:
    with pytest.raises(InvalidArgument, match="must be ecdsa or rsa"):
        build_root_certificate(SoftwareSigner.generate("ed25519"), GUN)


NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("cn", "not_before", "gun", "error"),
    [
        pytest.param(GUN, NOW, GUN, None, id="valid"),
        pytest.param("registry.example.com:5000/acme/*", NOW, GUN, None, id="wildcard-cn"),
        pytest.param("other/app", NOW, GUN, "does not match GUN", id="cn-mismatch"),
        pytest.param(GUN + "x", NOW, GUN, "does not match GUN", id="cn-longer"),
        pytest.param(GUN, NOW - timedelta(days=3651), GUN, "expired", id="expired"),
        pytest.param(GUN, NOW + timedelta(hours=23), GUN, None, id="starts-within-a-day"),
        pytest.param(GUN, NOW + timedelta(days=2), GUN, "not valid yet", id="not-yet-valid"),
    ],
)
def test_check_root_certificate(cn: str, not_before: datetime, gun: str, error: str | None) -> None:
    pem = build_root_certificate(SoftwareSigner.generate(), cn, not_before=not_before)
    if error is None:
        cert = check_root_certificate(pem, gun, now=NOW)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    else:
        with pytest.raises(VerificationError, match=error) as err:
            check_root_certificate(pem, gun, now=NOW)
        assert err.value.file == "root.json"


def test_tampered_certificate_fails_self_signature() -> None:
    pem = build_root_certificate(SoftwareSigner.generate(), GUN)
    der = bytearray(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature
    cert = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(cert)
    with pytest.raises(InvalidSignature):
        verify_self_signature(cert)
