"""TUF public keys as Notary writes them, and signature checks as Notary does them."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signerd.canonicaljson import encode_canonical
from signerd.errors import InvalidArgument
from signerd.keys import PublicKey, load_public_key

X509_KEYTYPES = {"ecdsa-x509": "ecdsa", "rsa-x509": "rsa"}
KEYTYPES = ("ecdsa", "rsa", "ed25519", *X509_KEYTYPES)
MIN_RSA_BITS = 2048  # notary's verifiers refuse smaller RSA keys


@dataclass(frozen=True)
class TufKey:
    """A public key as it appears in root.json or a targets delegation.

    ``public`` is the decoded ``keyval.public``: DER SPKI (ecdsa, rsa), 32 raw
    bytes (ed25519) or PEM certificate bytes (ecdsa-x509, rsa-x509).
    """

    keytype: str
    public: bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with ``private`` null as Notary writes public keys."""
        return {
            "keytype": self.keytype,
            "keyval": {"private": None, "public": base64.b64encode(self.public).decode()},
        }

    @classmethod
    def from_dict(cls, value: Any) -> TufKey:
        """Parse the JSON form; raises InvalidArgument on anything malformed."""
        try:
            keytype = value["keytype"]
            public = base64.b64decode(value["keyval"]["public"], validate=True)
        except (KeyError, TypeError, ValueError) as e:  # ValueError: binascii.Error, non-ASCII
            raise InvalidArgument(f"malformed public key: {e}") from None
        if keytype not in KEYTYPES:
            raise InvalidArgument(f"unsupported key type {keytype!r}")
        return cls(keytype, public)

    @property
    def key_id(self) -> str:
        """The ID metadata uses: hex SHA-256 of the canonical JSON form."""
        return hashlib.sha256(encode_canonical(self.to_dict())).hexdigest()

    @property
    def certificate(self) -> x509.Certificate | None:
        """The (first) certificate of an x509 key; None for bare keys."""
        if self.keytype not in X509_KEYTYPES:
            return None
        try:
            return x509.load_pem_x509_certificate(self.public)
        except ValueError as e:
            raise InvalidArgument(f"{self.keytype} key holds no PEM certificate: {e}") from None

    @property
    def canonical_id(self) -> str:
        """The ID of the bare public key: for x509 keys, the certificate's key.

        This is the ID key stores use (notary's utils.CanonicalKeyID), so a
        signer's ``key_id`` matches it.
        """
        cert = self.certificate
        if cert is None:
            return self.key_id
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return TufKey(X509_KEYTYPES[self.keytype], spki).key_id

    def verify(self, method: str, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` by this key over ``message`` is valid for ``method``.

        Mirrors notary's tuf/signed/verifiers.go: ECDSA is raw r||s over SHA-256
        whatever the curve, RSA-PSS uses salt length 32, RSA keys under 2048
        bits are refused.
        """
        try:
            key = self._crypto_key()
        except (InvalidArgument, ValueError):
            return False
        try:
            if method == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
                size = (key.curve.key_size + 7) // 8
                if len(signature) != 2 * size:
                    return False
                r = int.from_bytes(signature[:size], "big")
                s = int.from_bytes(signature[size:], "big")
                key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
            elif method in ("rsapss", "rsapkcs1v15") and isinstance(key, rsa.RSAPublicKey):
                if key.key_size < MIN_RSA_BITS:
                    return False
                pad: padding.AsymmetricPadding = (
                    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
                    if method == "rsapss"
                    else padding.PKCS1v15()
                )
                key.verify(signature, message, pad, hashes.SHA256())
            elif method == "eddsa" and isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                return False
        except InvalidSignature:
            return False
        return True

    def _crypto_key(self) -> PublicKey:
        if self.keytype == "ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(self.public)
        cert = self.certificate
        if cert is None:
            return load_public_key(self.public)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return load_public_key(spki)


def key_from_pem(pem: bytes) -> TufKey:
    """A TufKey from a PEM ``PUBLIC KEY`` or ``CERTIFICATE`` (notary's ParsePEMPublicKey).

    A public key becomes ``ecdsa``/``rsa``/``ed25519``; a certificate becomes
    ``ecdsa-x509``/``rsa-x509`` holding exactly that certificate.
    """
    text = pem.strip()
    if text.startswith(b"-----BEGIN CERTIFICATE-----"):
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as e:
            raise InvalidArgument(f"could not parse the certificate: {e}") from None
        public = cert.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            keytype = "ecdsa-x509"
        elif isinstance(public, rsa.RSAPublicKey):
            keytype = "rsa-x509"
        else:
            raise InvalidArgument("certificates must hold an ECDSA or RSA key")
        return TufKey(keytype, cert.public_bytes(serialization.Encoding.PEM))
    try:
        loaded = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise InvalidArgument(f"expected a PEM PUBLIC KEY or CERTIFICATE: {e}") from None
    if isinstance(loaded, ed25519.Ed25519PublicKey):
        raw = loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return TufKey("ed25519", raw)
    spki = loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(loaded, ec.EllipticCurvePublicKey):
        return TufKey("ecdsa", spki)
    if isinstance(loaded, rsa.RSAPublicKey):
        return TufKey("rsa", spki)
    raise InvalidArgument(f"unsupported public key type {type(loaded).__name__}")
