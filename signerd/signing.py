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

from signerd.errors import InvalidArgument
from signerd.keys import Algorithm, load_public_key
from signerd.token import _p11


class Encoding(Enum):
    RAW = "raw"  # ECDSA r||s, each padded to the curve size (TUF, Notary)
    DER = "der"  # ECDSA DER SEQUENCE {r, s} (securesystemslib, cosign)


class RsaPadding(Enum):
    # RSASSA-PSS, MGF1 with the digest's own hash, salt as long as the digest:
    # SHA-256 and salt 32 for messages; SHA-384/-512 for digests of 48/64 bytes.
    PSS = "pss"
    PKCS1V15 = "pkcs1v15"


@dataclass(frozen=True)
class SignOptions:
    encoding: Encoding = Encoding.RAW
    rsa_padding: RsaPadding = RsaPadding.PSS
    prehashed: bool = False  # the payload is a digest, not the whole message


PSS_SALT = 32  # SHA-256's size: the salt of every signature over a whole message
_DIGEST_INFO = {  # RFC 8017 §9.2 note 1: DER DigestInfo prefixes
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# RSASSA-PSS as RFC 8017 §9.1 and RFC 7518 §3.5 (JWS PS256/PS384/PS512, which
# Notation verifies: notation-core-go signature/jws, golang-jwt) use it: MGF1
# with the message hash, and a salt as long as the digest. PKCS#11 v2.40
# §2.1.10 CK_RSA_PKCS_PSS_PARAMS: hashAlg, mgf, sLen in bytes.
_PSS = {
    "sha256": _p11.Mechanism(_p11.CKM_RSA_PKCS_PSS, _p11.CKM_SHA256, _p11.CKG_MGF1_SHA256, 32),
    "sha384": _p11.Mechanism(_p11.CKM_RSA_PKCS_PSS, _p11.CKM_SHA384, _p11.CKG_MGF1_SHA384, 48),
    "sha512": _p11.Mechanism(_p11.CKM_RSA_PKCS_PSS, _p11.CKM_SHA512, _p11.CKG_MGF1_SHA512, 64),
}
_ECDSA = _p11.Mechanism(_p11.CKM_ECDSA)
_EDDSA = _p11.Mechanism(_p11.CKM_EDDSA)
_RSA_PKCS = _p11.Mechanism(_p11.CKM_RSA_PKCS)


def method(alg: Algorithm, options: SignOptions) -> str:
    """The TUF/Notary signature method name."""
    if alg.keytype == "rsa":
        return "rsapss" if options.rsa_padding is RsaPadding.PSS else "rsa-pkcs1v15"
    return "eddsa" if alg.keytype == "ed25519" else "ecdsa"


_DIGEST_NAMES = {32: "sha256", 48: "sha384", 64: "sha512"}
_HASHES: dict[int, hashes.HashAlgorithm] = {
    32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}


def digest_of(alg: Algorithm, payload: bytes, options: SignOptions) -> bytes:
    """The digest the token signs (ECDSA, RSA), checking a precomputed one.

    A whole message is hashed with the algorithm's hash (SHA-256; SHA-384 for
    P-384). A precomputed digest's hash is known by its length:
    RSA takes SHA-256, SHA-384 or SHA-512 (32, 48 or 64 bytes: the PSS
    parameters and the PKCS#1 v1.5 DigestInfo follow it; Notation signs
    RSA-3072 with PS384 and RSA-4096 with PS512). ECDSA signs a SHA-256 or
    SHA-384 digest no longer than the curve: P-384 also takes SHA-256, which
    is what TUF and Notary verify ECDSA with.

    Raises InvalidArgument for a digest of another length.
    """
    assert alg.hash_name is not None and alg.digest_size is not None
    if not options.prehashed:
        return hashlib.new(alg.hash_name, payload).digest()
    if alg.keytype == "ecdsa":
        accepted = [n for n in _DIGEST_NAMES if n <= alg.digest_size]
    else:
        accepted = list(_DIGEST_NAMES)
    if len(payload) not in accepted:
        sizes = " or ".join(f"{n} ({_DIGEST_NAMES[n].upper()})" for n in accepted)
        raise InvalidArgument(
            f"digest is {len(payload)} bytes, but {alg.name} signs a digest of {sizes} bytes"
        )
    return payload


def prepare(alg: Algorithm, payload: bytes, options: SignOptions) -> tuple[_p11.Mechanism, bytes]:
    """The mechanism and the bytes to hand to C_Sign.

    Raises InvalidArgument (an empty payload, a digest of the wrong size, a
    digest for Ed25519)."""
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
    name = _DIGEST_NAMES[len(digest)]
    if options.rsa_padding is RsaPadding.PSS:
        return _PSS[name], digest
    return _RSA_PKCS, _DIGEST_INFO[name] + digest


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
    chosen = _HASHES[len(digest)]
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
            padding.PSS(mgf=padding.MGF1(chosen), salt_length=len(digest))
            if options.rsa_padding is RsaPadding.PSS
            else padding.PKCS1v15()
        )
        key.verify(signature, digest, pad, prehashed)
