"""Sign requests: what the token is asked to sign, and how its output is encoded.

Every mechanism and parameter is spelled out here; nothing relies on a
library's defaults (python-pkcs11 defaults EC to ECDSA_SHA512 and PSS to
SHA-1 with salt 20).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signerd import _p11
from signerd.errors import InvalidArgument
from signerd.keys import Algorithm, load_public_key


class Encoding(Enum):
    RAW = "raw"  # ECDSA r||s, each padded to the curve size (TUF, Notary)
    DER = "der"  # ECDSA DER SEQUENCE {r, s} (securesystemslib, cosign)


class RsaPadding(Enum):
    PSS = "pss"  # RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32
    PKCS1V15 = "pkcs1v15"


@dataclass(frozen=True)
class SignOptions:
    encoding: Encoding = Encoding.RAW
    rsa_padding: RsaPadding = RsaPadding.PSS
    prehashed: bool = False  # the payload is a digest, not the whole message


PSS_SALT = 32
_DIGEST_INFO = {  # RFC 8017 §9.2 note 1: DER DigestInfo prefixes
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
}
_PSS = {
    "sha256": _p11.Mechanism(
        _p11.CKM_RSA_PKCS_PSS, _p11.CKM_SHA256, _p11.CKG_MGF1_SHA256, PSS_SALT
    ),
}
_ECDSA = _p11.Mechanism(_p11.CKM_ECDSA)
_EDDSA = _p11.Mechanism(_p11.CKM_EDDSA)
_RSA_PKCS = _p11.Mechanism(_p11.CKM_RSA_PKCS)


def method(alg: Algorithm, options: SignOptions) -> str:
    """The TUF/Notary signature method name."""
    if alg.keytype == "rsa":
        return "rsapss" if options.rsa_padding is RsaPadding.PSS else "rsa-pkcs1v15"
    return "eddsa" if alg.keytype == "ed25519" else "ecdsa"


_DIGEST_NAMES = {32: "sha256", 48: "sha384"}


def digest_of(alg: Algorithm, payload: bytes, options: SignOptions) -> bytes:
    """The digest the token signs (ECDSA, RSA), checking a precomputed one.

    RSA signs SHA-256 digests (the PSS parameters and DigestInfo say so).
    ECDSA signs a SHA-256 or SHA-384 digest no longer than the curve: P-384
    also takes SHA-256, which is what TUF and Notary verify ECDSA with.
    """
    assert alg.hash_name is not None and alg.digest_size is not None
    if not options.prehashed:
        return hashlib.new(alg.hash_name, payload).digest()
    if alg.keytype == "ecdsa":
        accepted = [n for n in _DIGEST_NAMES if n <= alg.digest_size]
    else:
        accepted = [32]
    if len(payload) not in accepted:
        sizes = " or ".join(f"{n} ({_DIGEST_NAMES[n].upper()})" for n in accepted)
        raise InvalidArgument(
            f"digest is {len(payload)} bytes, but {alg.name} signs a digest of {sizes} bytes"
        )
    return payload


def prepare(alg: Algorithm, payload: bytes, options: SignOptions) -> tuple[_p11.Mechanism, bytes]:
    """The mechanism and the bytes to hand to C_Sign."""
    if not payload:
        raise InvalidArgument("nothing to sign: the message (or digest) is empty")
    if alg.keytype == "ed25519":
        if options.prehashed:
            raise InvalidArgument(
                "ed25519 keys sign whole messages (pure EdDSA): send 'message', not 'digest'"
            )
        return _EDDSA, payload
    digest = digest_of(alg, payload, options)
    if alg.keytype == "ecdsa":
        return _ECDSA, digest
    if options.rsa_padding is RsaPadding.PSS:
        return _PSS["sha256"], digest
    return _RSA_PKCS, _DIGEST_INFO["sha256"] + digest


def encode(alg: Algorithm, raw: bytes, options: SignOptions) -> bytes:
    """Encode the token's output. Only ECDSA has two encodings."""
    if alg.keytype != "ecdsa" or options.encoding is Encoding.RAW:
        return raw
    half = len(raw) // 2
    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    return utils.encode_dss_signature(r, s)


def verify(
    spki_der: bytes, alg: Algorithm, signature: bytes, payload: bytes, options: SignOptions
) -> None:
    """Verify locally with ``cryptography``; raise InvalidSignature on failure."""
    key = load_public_key(spki_der)
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, payload)
        return
    digest = digest_of(alg, payload, options)
    chosen: hashes.HashAlgorithm = hashes.SHA384() if len(digest) == 48 else hashes.SHA256()
    prehashed = utils.Prehashed(chosen)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if options.encoding is Encoding.RAW:
            if len(signature) != alg.signature_size:
                raise InvalidSignature(f"raw ECDSA signature must be {alg.signature_size} bytes")
            half = len(signature) // 2
            signature = utils.encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
        key.verify(signature, digest, ec.ECDSA(prehashed))
    elif isinstance(key, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT)
            if options.rsa_padding is RsaPadding.PSS
            else padding.PKCS1v15()
        )
        key.verify(signature, digest, pad, prehashed)
