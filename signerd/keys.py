"""Key model: algorithms, GUN and role names, public key formats, key IDs."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import NewType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signerd.canonicaljson import encode_canonical
from signerd.errors import InvalidArgument, quoted

KeyID = NewType("KeyID", str)
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class Algorithm:
    """A key algorithm signerd can generate and sign with."""

    name: str
    keytype: str  # TUF/Notary key type: "ecdsa", "rsa" or "ed25519"
    bits: int  # curve size or modulus size
    hash_name: str | None  # digest of "sign a whole message"; None for pure EdDSA
    curve: str | None = None  # named curve, for EC keys

    @property
    def signature_size(self) -> int:
        """Size of a raw signature: r||s for ECDSA, the modulus for RSA."""
        if self.keytype == "rsa":
            return self.bits // 8
        return 2 * ((self.bits + 7) // 8)

    @property
    def digest_size(self) -> int | None:
        return {"sha256": 32, "sha384": 48}.get(self.hash_name or "")


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ecdsa-p256", "ecdsa", 256, "sha256", "secp256r1"),
        Algorithm("ecdsa-p384", "ecdsa", 384, "sha384", "secp384r1"),
        Algorithm("rsa-2048", "rsa", 2048, "sha256"),
        Algorithm("rsa-3072", "rsa", 3072, "sha256"),
        Algorithm("rsa-4096", "rsa", 4096, "sha256"),
        Algorithm("ed25519", "ed25519", 256, None),
    )
}
DEFAULT_ALGORITHM = "ecdsa-p256"


def parse_algorithm(name: str) -> Algorithm:
    """The algorithm called ``name``; empty means the default (ecdsa-p256)."""
    try:
        return ALGORITHMS[name or DEFAULT_ALGORITHM]
    except KeyError:
        raise InvalidArgument(
            f"unknown algorithm {quoted(name)}; use one of: {', '.join(ALGORITHMS)}"
        ) from None


# One validator per kind of name, each matching the whole string (fullmatch:
# Python's "$" would also accept a trailing newline).
#
# GUNs follow Docker's reference grammar (distribution/reference regexp.go):
# a domain (DNS components, "--" allowed inside as in punycode "xn--" hosts, or
# an IPv6 literal in brackets) with an optional port, then path components.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = (
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_GUN_RE = re.compile(rf"(?P<domain>{_DOMAIN})/(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Notary's delegation names (tuf/data/roles.go IsDelegation): "targets/" then
# only [-a-z0-9_/], path.Clean unchanged (no empty segment, no trailing "/").
_DELEGATION_RE = re.compile(r"targets(?:/[-a-z0-9_]+)+")
MAX_NAME_LENGTH = 255  # notary-server's gun and role columns are varchar(255)
BASE_ROLES = ("root", "targets", "snapshot", "timestamp")


def _docker_domain(domain: str) -> bool:
    # distribution/reference splitDockerDomain: the first component is a registry
    # host only if it is "localhost", holds "." or ":", or has upper case.
    return domain == "localhost" or any(c in domain for c in ".:") or domain.lower() != domain


def validate_gun(gun: str) -> str:
    """A Notary GUN: Docker's fully qualified repository name, ``registry.example.com/acme/app``.

    The first component must be a registry host as Docker reads one, and the
    name must be canonical (``docker.io/library/app``, not ``docker.io/app``
    or ``index.docker.io/...``), so that it is what Docker asks Notary for.
    """
    if not gun:
        raise InvalidArgument("gun is required, for example 'docker.io/acme/app'")
    m = _GUN_RE.fullmatch(gun) if len(gun) <= MAX_NAME_LENGTH else None
    if m is None:
        raise InvalidArgument(
            f"invalid gun {quoted(gun)}: use a repository name such as 'docker.io/acme/app' "
            "(a registry host, then lowercase path components of letters, digits, "
            f"'.', '_', '-', separated by '/'; at most {MAX_NAME_LENGTH} characters)"
        )
    domain, path = m["domain"], m["path"]
    if not _docker_domain(domain):
        raise InvalidArgument(
            f"invalid gun {quoted(gun)}: Docker would not read {quoted(domain)} as a registry "
            "host; "
            f"name the registry, for example 'docker.io/{gun}'"
        )
    if domain == "index.docker.io" or (domain == "docker.io" and "/" not in path):
        canonical = f"docker.io/{path if '/' in path else 'library/' + path}"
        raise InvalidArgument(f"invalid gun {quoted(gun)}: Docker's canonical name is "
                              f"{quoted(canonical)}")
    return gun


def validate_tag(tag: str) -> str:
    """A Docker tag (distribution/reference): ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``."""
    if not _TAG_RE.fullmatch(tag):
        raise InvalidArgument(
            f"invalid tag {quoted(tag)}: up to 128 letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'"
        )
    return tag


def validate_role(role: str) -> str:
    """A base role, or a delegation ``targets/NAME`` as Notary allows it."""
    if role in BASE_ROLES:
        return role
    if not role:
        raise InvalidArgument(
            "role is required: root, targets, targets/<name>, snapshot or timestamp"
        )
    if len(role) > MAX_NAME_LENGTH or not _DELEGATION_RE.fullmatch(role):
        raise InvalidArgument(
            f"invalid role {quoted(role)}: use root, targets, snapshot, timestamp or "
            "targets/<name>, a name of lowercase letters, digits, '-' and '_' "
            "(Notary's rule; '/' separates nested delegations)"
        )
    return role


#: What a key signs (fixed when it is made, kept on the token with its metadata):
#: ``metadata`` keys sign TUF/Notary metadata of their own role, checked first
#: (signerd.content); ``raw`` keys sign opaque messages and digests (cosign, Notation,
#: certificates of other keys).
METADATA = "metadata"
RAW = "raw"
PURPOSES = (METADATA, RAW)


def validate_purpose(purpose: str) -> str:
    """``metadata`` or ``raw``; InvalidArgument otherwise."""
    if purpose not in PURPOSES:
        raise InvalidArgument(
            f"invalid purpose {quoted(purpose)}: use 'metadata' (TUF/Notary metadata of the "
            "key's role, checked before signing) or 'raw' (opaque messages and digests)")
    return purpose


def purpose_by_rule(role: str) -> str:
    """The purpose of a key made before purposes were recorded (signerd 0.x).

    Every such key's role is a TUF role name (root, targets, targets/NAME, snapshot,
    timestamp), and the Notary API, ``signerctl trust`` and python-tuf made metadata keys
    under them: such a key is ``metadata``. A key that was really a cosign or Notation key
    is set ``raw`` once by its operator (``signerctl keys set-purpose KEYID raw``; the
    README's upgrade steps). ``role`` is accepted for the day a rule needs it.
    """
    del role
    return METADATA


def load_public_key(spki_der: bytes) -> PublicKey:
    key = serialization.load_der_public_key(spki_der)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise InvalidArgument(f"unsupported public key type {type(key).__name__}")
    return key


def public_key_algorithm(key: PublicKey) -> Algorithm:
    """The algorithm signerd signs with for a public key: ECDSA P-256 or
    P-384, RSA of any size (SHA-256 for whole messages, as signerd's
    rsa-* keys), or Ed25519. Raises InvalidArgument for another curve."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ALGORITHMS["ed25519"]
    if isinstance(key, rsa.RSAPublicKey):
        return ALGORITHMS.get(f"rsa-{key.key_size}") or Algorithm(
            f"rsa-{key.key_size}", "rsa", key.key_size, "sha256")
    for alg in ALGORITHMS.values():
        if alg.curve == key.curve.name:
            return alg
    raise InvalidArgument(f"unsupported curve {key.curve.name}: signerd signs with P-256, "
                          "P-384, RSA or Ed25519 keys")


def tuf_public_bytes(keytype: str, spki_der: bytes) -> bytes:
    """The TUF/Notary "public" value: DER SPKI, or raw 32 bytes for ed25519."""
    if keytype != "ed25519":
        return spki_der
    key = load_public_key(spki_der)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(keytype: str, tuf_public: bytes) -> KeyID:
    """TUF/Notary key ID: hex SHA-256 of the canonical JSON public key."""
    doc = {
        "keytype": keytype,
        "keyval": {"private": None, "public": base64.b64encode(tuf_public).decode()},
    }
    return KeyID(hashlib.sha256(encode_canonical(doc)).hexdigest())


_KEY_ID = re.compile(r"[0-9a-f]{64}")


def validate_key_id(value: str) -> KeyID:
    """``value`` as a KeyID: 64 lowercase hex characters, the hex SHA-256 of
    Notary's canonical public key (see :func:`key_id`). Raises InvalidArgument."""
    if _KEY_ID.fullmatch(value) is None:
        raise InvalidArgument(
            f"invalid key_id {quoted(value)}: expected 64 lowercase hex characters (a TUF key ID)"
        )
    return KeyID(value)


def spki_to_pem(spki_der: bytes) -> str:
    return (
        load_public_key(spki_der)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
