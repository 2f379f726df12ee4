"""How signerd's keys sit on a token: object attributes, metadata, public key material.

Two layouts are read; new keys are always written in the second.

**Layout 1** (signerd 0.1; still read, never written): the key pair's
``CKA_ID`` is the 32-byte TUF key ID and its ``CKA_LABEL`` a JSON document
(``{"alg","gun","role","signerd":1,"used"}``). It does not fit a YubiHSM 2,
whose PKCS#11 module maps ``CKA_ID`` to a 16-bit object ID and keeps labels of
at most 40 bytes (yubihsm-shell ``pkcs11/util_pkcs11.c``,
``parse_meta_id_template``/``parse_meta_label_template``: longer values cost
an extra "meta" object per key).

**Layout 2** fits the strictest token in scope:

- the key pair: ``CKA_ID`` = random bytes, as many as the token's profile
  says (:attr:`signerd.token.profiles.Profile.id_bytes`: 16, so that no
  search for a free one is needed; 2 on a YubiHSM, whose module maps
  ``CKA_ID`` to its 16-bit object ID); ``CKA_LABEL`` = ``signerd:<algorithm>``
  (at most 40 bytes). Both are set in the generation templates, identical on
  the public and the private half, since a YubiHSM cannot change them
  afterwards without meta objects.
- its metadata: one ``CKO_DATA`` object labelled ``signerd:`` + the first 32
  hex digits of the key ID (so a key is found by its ID with one search),
  with ``CKA_APPLICATION`` = ``signerd`` and ``CKA_VALUE`` = compact JSON
  ``{"alg","gun","id","kid","role","signerd":2}``, where ``id`` is the key
  pair's CKA_ID in hex, plus ``"used":true`` once the key has signed
  (Notary's key reuse rule). Fields this version does not know are kept as
  read and written back when the object is rewritten. A data object has no
  ``CKA_ID`` in PKCS#11 (v2.40 §4.5; SoftHSM refuses one), so the tie is the
  key ID in the label and the CKA_ID in the value. It is public
  (``CKA_PRIVATE`` false) except where the profile says otherwise:
  YubiHSM's module refuses private data objects, and a GUN and role are no
  secret.
- "has signed" is recorded by writing a new metadata object with
  ``"used":true``, then destroying the old one: a YubiHSM cannot rewrite an
  object, and making one is atomic on every token. A crash in between leaves
  two metadata objects for one key; a key is used if any says so, and the
  sweep (:mod:`signerd.token._sweep`) removes the extra one. So a key costs
  two objects on the token (three for a moment while it is marked, four
  with a certificate). Tokens written before kept "has signed" in an object
  of its own, labelled ``signerd-used:`` + 27 hex digits of the key ID; it
  is still read, and deleted with its key.

A key's **purpose** (``metadata`` or ``raw``, :data:`signerd.keys.PURPOSES`) is
the ``purpose`` field of its metadata value, written when the key is made.
Keys made before purposes existed have none: theirs is
:func:`signerd.keys.purpose_by_rule`. ``signerctl keys set-purpose`` never
rewrites the metadata object (a YubiHSM cannot): it makes a purpose object,
a ``CKO_DATA`` object labelled ``signerd-purpose:`` + 24 hex digits of the
key ID, public, with ``CKA_VALUE`` = compact JSON ``{"kid","n","purpose"}``.
The one with the highest ``n`` wins over the metadata's field; a new one is
made (``n`` + 1) before older ones are destroyed, so a crash between the two
leaves the new purpose in force.

A key's X.509 certificate (``signerctl keys certify``) is where other
PKCS#11 clients look for it (v2.40 §4.6): one ``CKO_CERTIFICATE`` object of
type ``CKC_X_509`` with the key pair's ``CKA_ID``, ``CKA_VALUE`` = the DER
certificate, ``CKA_SUBJECT``, ``CKA_ISSUER`` and ``CKA_SERIAL_NUMBER`` (DER,
as the certificate has them), labelled ``signerd-cert:`` + 27 hex digits of
the key ID, and public (``CKA_PRIVATE`` false): YubiHSM's module stores it as
an opaque X.509 object and refuses private ones, and tpm2-pkcs11 refuses
private certificates too. Certifying a key again writes the new object
before destroying the old one, so a crash leaves the key with one of them
(except on a YubiHSM, which keeps one object per ID and type: there the old
one goes first).

The key ID is never trusted from the token: it is computed from the public
key (:func:`signerd.keys.key_id`) and must match what the metadata says; a
certificate is used only if its public key is the key's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from asn1crypto.core import OctetString
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from signerd.keys import ALGORITHMS, PURPOSES, Algorithm, KeyID

APPLICATION = b"signerd"
MAX_LABEL = 40  # bytes: the YubiHSM 2 limit, the strictest token in scope
_V1_TAG = "signerd"
_META_PREFIX = "signerd:"
_USED_PREFIX = "signerd-used:"
_CERT_PREFIX = "signerd-cert:"
_PURPOSE_PREFIX = "signerd-purpose:"
META_KID_HEX = MAX_LABEL - len(_META_PREFIX)  # 32 hex digits = 128 bits of the key ID
USED_KID_HEX = MAX_LABEL - len(_USED_PREFIX)  # 27 hex digits = 108 bits
CERT_KID_HEX = MAX_LABEL - len(_CERT_PREFIX)  # 27 hex digits
PURPOSE_KID_HEX = MAX_LABEL - len(_PURPOSE_PREFIX)  # 24 hex digits = 96 bits

# DER OBJECT IDENTIFIERs for CKA_EC_PARAMS (RFC 5480 §2.1.1.1, RFC 8410 §3)
CURVE_OIDS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "ed25519": bytes.fromhex("06032b6570"),
}
# DER SubjectPublicKeyInfo up to the key bits, per curve: listing builds SPKIs
# by concatenation rather than parsing each point with ``cryptography``
# (0.3 s for 10,000 keys). Nothing is trusted blindly: the SPKI must still
# hash to the key ID the metadata names.
_SPKI_PREFIX = {
    "secp256r1": bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
    "secp384r1": bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200"),
    None: bytes.fromhex("302a300506032b6570032100"),  # ed25519
}


@dataclass(frozen=True)
class KeyMeta:
    """What signerd records of a key beside the key itself."""

    algorithm: Algorithm
    gun: str
    role: str
    key_id: KeyID | None = None  # layout 2 records it; layout 1's CKA_ID is it
    object_id: bytes = b""  # layout 2: the key pair's CKA_ID
    purpose: str = ""  # "metadata" or "raw"; "" for keys made before purposes
    used: bool = False  # layout 2: the metadata says the key has signed
    # Fields of the metadata this version does not know, as read (name, JSON
    # value): written back unchanged when the metadata is rewritten.
    extra: tuple[tuple[str, Any], ...] = ()


# -- layout 1 (read, and relabelled when a key first signs) -----------------


def v1_label(alg: Algorithm, gun: str, role: str, used: bool) -> bytes:
    """The JSON CKA_LABEL of a layout 1 key."""
    return json.dumps(
        {_V1_TAG: 1, "alg": alg.name, "gun": gun, "role": role, "used": used},
        separators=(",", ":"), sort_keys=True,
    ).encode()


def parse_v1_label(label: bytes | None) -> tuple[KeyMeta, bool] | None:
    """(metadata, used) from a layout 1 CKA_LABEL; None if it is not one."""
    meta = _json_object(label)
    if meta is None or meta.get(_V1_TAG) != 1:
        return None
    alg = ALGORITHMS.get(str(meta.get("alg")))
    if alg is None or not isinstance(meta.get("gun"), str) or not isinstance(meta.get("role"), str):
        return None
    return KeyMeta(alg, meta["gun"], meta["role"]), bool(meta.get("used"))


# -- layout 2 ---------------------------------------------------------------


def key_label(alg: Algorithm) -> bytes:
    """CKA_LABEL of a layout 2 key pair: readable in any PKCS#11 tool."""
    return f"{_META_PREFIX}{alg.name}".encode()


def parse_key_label(label: bytes | None) -> Algorithm | None:
    """The algorithm a layout 2 key pair's label names, or None."""
    text = (label or b"").decode("ascii", "replace")
    return ALGORITHMS.get(text[len(_META_PREFIX):]) if text.startswith(_META_PREFIX) else None


def meta_label(kid: KeyID) -> bytes:
    """CKA_LABEL of a key's metadata object (40 bytes)."""
    return f"{_META_PREFIX}{kid[:META_KID_HEX]}".encode()


def used_label(kid: KeyID) -> bytes:
    """CKA_LABEL of a key's "has signed" object (40 bytes)."""
    return f"{_USED_PREFIX}{kid[:USED_KID_HEX]}".encode()


def cert_label(kid: KeyID) -> bytes:
    """CKA_LABEL of a key's certificate object (40 bytes)."""
    return f"{_CERT_PREFIX}{kid[:CERT_KID_HEX]}".encode()


def purpose_label(kid: KeyID) -> bytes:
    """CKA_LABEL of a key's purpose object (40 bytes)."""
    return f"{_PURPOSE_PREFIX}{kid[:PURPOSE_KID_HEX]}".encode()


def purpose_value(kid: KeyID, purpose: str, n: int) -> bytes:
    """CKA_VALUE of a purpose object: the ``n``-th purpose set for key ``kid``."""
    return json.dumps({"kid": kid, "n": n, "purpose": purpose},
                      separators=(",", ":"), sort_keys=True).encode()


def parse_purpose_value(label: bytes | None,
                        value: bytes | None) -> tuple[KeyID, int, str] | None:
    """(key ID, n, purpose) of a purpose object, or None if it is not one."""
    if not (label or b"").startswith(_PURPOSE_PREFIX.encode()):
        return None
    raw = _json_object(value)
    if raw is None:
        return None
    kid, n, purpose = raw.get("kid"), raw.get("n"), raw.get("purpose")
    if (not isinstance(kid, str) or len(kid) != 64 or type(n) is not int
            or purpose not in PURPOSES):
        return None
    return KeyID(kid), n, str(purpose)


def used_prefix(label: bytes | None) -> str | None:
    """The key ID prefix a "has signed" label names, or None."""
    text = (label or b"").decode("ascii", "replace")
    return text[len(_USED_PREFIX):] if text.startswith(_USED_PREFIX) else None


_META_FIELDS = frozenset({"signerd", "alg", "gun", "role", "kid", "id", "used", "purpose"})


def meta_value(meta: KeyMeta) -> bytes:
    """CKA_VALUE of a metadata object (``"purpose"`` where the key has one,
    ``"used"`` only once the key has signed, and the fields this version does
    not know as they were read)."""
    doc: dict[str, Any] = dict(meta.extra)
    doc.update({"signerd": 2, "alg": meta.algorithm.name, "gun": meta.gun, "role": meta.role,
                "kid": meta.key_id, "id": meta.object_id.hex()})
    if meta.purpose:
        doc["purpose"] = meta.purpose
    if meta.used:
        doc["used"] = True
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def parse_meta_value(value: bytes | None) -> KeyMeta | None:
    """A metadata object's KeyMeta, or None if the value is not one."""
    meta = _json_object(value)
    if meta is None or meta.get("signerd") != 2:
        return None
    alg = ALGORITHMS.get(str(meta.get("alg")))
    kid, object_id = meta.get("kid"), meta.get("id")
    if (alg is None or not isinstance(kid, str) or len(kid) != 64
            or not isinstance(object_id, str)
            or not isinstance(meta.get("gun"), str) or not isinstance(meta.get("role"), str)):
        return None
    try:
        raw_id = bytes.fromhex(object_id)
    except ValueError:
        return None
    purpose = meta.get("purpose")  # absent for keys made before purposes
    # A purpose this version does not know (a later one's) is kept as read, like
    # any unknown field, and written back; the key's purpose is then the rule's.
    extra = tuple(sorted((k, v) for k, v in meta.items() if k not in _META_FIELDS
                         or (k == "purpose" and v not in PURPOSES)))
    return KeyMeta(alg, meta["gun"], meta["role"], KeyID(kid), raw_id,
                   purpose if purpose in PURPOSES else "", meta.get("used") is True, extra)


def new_object_id(size: int = 2) -> bytes:
    """A random CKA_ID of ``size`` bytes for a key pair (never all zero,
    which YubiHSM reads as "pick one"). Two bytes is what a YubiHSM takes;
    sixteen are enough for no two keys ever to draw the same."""
    while True:
        candidate = secrets.token_bytes(size)
        if any(candidate) and len(candidate) != 32:  # 32 bytes would read as layout 1
            return candidate


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- public key material ----------------------------------------------------


def algorithm_of(object_id: bytes, label: bytes | None) -> Algorithm | None:
    """The algorithm a key pair's CKA_ID and CKA_LABEL name, in either
    layout; None if the pair is not signerd's."""
    if len(object_id) == 32:
        v1 = parse_v1_label(label)
        if v1 is not None:
            return v1[0].algorithm
    return parse_key_label(label)


def point_size(alg: Algorithm) -> int:
    """Bytes of the raw public point: 0x04||X||Y for ECDSA, 32 for Ed25519."""
    if alg.keytype == "ed25519":
        return 32
    return 1 + 2 * ((alg.bits + 7) // 8)


def ec_point(value: bytes, size: int) -> bytes:
    """The raw point inside a CKA_EC_POINT value.

    PKCS#11 v2.20 and later say CKA_EC_POINT is the DER encoding of an OCTET
    STRING holding the point (v2.40 §2.3.3; for Edwards keys the 32 raw bytes,
    PKCS#11 v3.0 §2.3.5), but several HSMs and older modules return the bare
    point. A bare uncompressed point starts with 0x04, as a DER OCTET STRING
    does, so the two are told apart by length and structure, never by the
    first byte: a value of exactly ``size`` bytes is the bare point; anything
    else must be one DER OCTET STRING, spanning the whole value, holding
    exactly ``size`` bytes.

    ``size`` is :func:`point_size` of the key's algorithm. Raises ValueError.
    """
    if len(value) == size and (size == 32 or value[0] == 0x04):
        return value
    try:
        inner = OctetString.load(value, strict=True).native
    except (ValueError, TypeError) as e:
        raise ValueError(f"CKA_EC_POINT is neither a {size}-byte point nor a DER "
                         f"OCTET STRING holding one: {e}") from None
    if not isinstance(inner, bytes) or len(inner) != size:
        raise ValueError(f"CKA_EC_POINT holds {len(inner or b'')} bytes, expected {size}")
    return inner


def spki(alg: Algorithm, ec_point_value: bytes | None, modulus: bytes | None,
         exponent: bytes | None) -> bytes:
    """DER SubjectPublicKeyInfo from a public key object's attributes
    (CKA_EC_POINT for EC and Edwards keys, CKA_MODULUS and
    CKA_PUBLIC_EXPONENT for RSA). Raises ValueError on missing or malformed
    material."""
    if alg.keytype == "rsa":
        if not modulus or not exponent:
            raise ValueError("RSA public key without CKA_MODULUS or CKA_PUBLIC_EXPONENT")
        key: Any = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"),
                                        int.from_bytes(modulus, "big")).public_key()
        return bytes(key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    if ec_point_value is None:
        raise ValueError("EC public key without CKA_EC_POINT")
    point = ec_point(ec_point_value, point_size(alg))
    if alg.keytype == "ed25519":
        ed25519.Ed25519PublicKey.from_public_bytes(point)  # raises ValueError if malformed
    return _SPKI_PREFIX[alg.curve] + point
