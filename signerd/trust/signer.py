"""What the trust library needs from a key: a public value and a way to sign.

signerd never holds real private keys in memory. The CLI layer supplies
daemon-backed and token-backed implementations of :class:`TrustSigner`;
:class:`SoftwareSigner` exists for tests and for checking expected outputs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signerd.errors import InvalidArgument
from signerd.keys import key_id as tuf_key_id

# Notary's signature method for each key type (tuf/data/types.go).
METHODS = {"ecdsa": "ecdsa", "rsa": "rsapss", "ed25519": "eddsa"}
PSS_SALT_LENGTH = 32  # notary's RSAPSSVerifier insists on salt length = SHA-256 size


class TrustSigner(Protocol):
    """A key that can sign TUF metadata.

    ``sign`` receives the whole message and returns Notary's signature format:
    ECDSA raw r||s over SHA-256 (even for P-384: notary's verifier always uses
    SHA-256), RSA-PSS SHA-256/MGF1-SHA-256/salt 32, or pure Ed25519.
    """

    @property
    def key_id(self) -> str:
        """Canonical TUF key ID of the bare public key (what key stores index)."""
        ...

    @property
    def keytype(self) -> str:
        """``ecdsa``, ``rsa`` or ``ed25519``."""
        ...

    @property
    def public(self) -> bytes:
        """TUF public value: DER SPKI for ecdsa/rsa, raw 32 bytes for ed25519."""
        ...

    @property
    def method(self) -> str:
        """Signature method written in the envelope: ``ecdsa``, ``rsapss`` or ``eddsa``."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Sign the whole ``message``."""
        ...


@runtime_checkable
class Pkcs1v15Signer(Protocol):
    """Optional extra for RSA root keys: PKCS#1 v1.5 SHA-256 signatures.

    Used only to sign a root certificate as sha256WithRSAEncryption; without it
    an RSA root certificate is signed with RSASSA-PSS.
    """

    def sign_pkcs1v15(self, message: bytes) -> bytes:
        """Sign the whole ``message`` with RSASSA-PKCS1-v1_5 over SHA-256."""
        ...


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class SoftwareSigner:
    """A :class:`TrustSigner` over an in-memory ``cryptography`` key. Tests only."""

    def __init__(self, private_key: PrivateKey) -> None:
        self._key = private_key
        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            self._keytype, self._public = "ecdsa", spki
        elif isinstance(private_key, rsa.RSAPrivateKey):
            self._keytype, self._public = "rsa", spki
        else:
            self._keytype = "ed25519"
            self._public = private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        self._key_id = str(tuf_key_id(self._keytype, self._public))

    @classmethod
    def generate(cls, keytype: str = "ecdsa") -> SoftwareSigner:
        """A fresh key: P-256 for ``ecdsa``, 2048-bit for ``rsa``, or ``ed25519``."""
        if keytype == "ecdsa":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if keytype == "rsa":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        if keytype == "ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate())
        raise InvalidArgument(f"unknown key type {keytype!r}: use ecdsa, rsa or ed25519")

    @property
    def key_id(self) -> str:
        """Canonical TUF key ID of the public key."""
        return self._key_id

    @property
    def keytype(self) -> str:
        """ecdsa, rsa or ed25519."""
        return self._keytype

    @property
    def public(self) -> bytes:
        """TUF public value."""
        return self._public

    @property
    def method(self) -> str:
        """Envelope signature method."""
        return METHODS[self._keytype]

    @property
    def private_key(self) -> PrivateKey:
        """The key itself, for tests that need to forge or inspect."""
        return self._key

    def sign(self, message: bytes) -> bytes:
        """Sign the whole message in Notary's format for this key type."""
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
            size = (key.curve.key_size + 7) // 8
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if isinstance(key, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
            return key.sign(message, pss, hashes.SHA256())
        return key.sign(message)

    def sign_pkcs1v15(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 over SHA-256; RSA keys only."""
        if not isinstance(self._key, rsa.RSAPrivateKey):
            raise InvalidArgument("PKCS#1 v1.5 signatures need an RSA key")
        return self._key.sign(message, padding.PKCS1v15(), hashes.SHA256())
