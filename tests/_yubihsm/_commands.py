"""The commands a YubiHSM 2 runs inside an authenticated session.

Each handler takes the session, the store and the command's payload and
returns the response payload, or raises SessionError with the device's
error byte. Payload layouts are the device's (Yubico's "YubiHSM 2 commands"
reference; python-yubihsm ``yubihsm/objects.py`` and yubihsm-shell
``lib/yubihsm.c`` build the same bytes on the host side). Signatures are
made with ``cryptography``.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests._yubihsm._defs import (
    KEY_ALGORITHMS,
    LABEL_LENGTH,
    MAX_MESSAGE,
    MAX_OBJECTS,
    Algorithm,
    Capability,
    Command,
    Error,
    ObjectType,
    bit,
)
from tests._yubihsm._scp03 import Session, SessionError
from tests._yubihsm._store import ORIGIN_GENERATED, ORIGIN_IMPORTED, Obj, Store, der, generate

Handler = Callable[[Session, Store, bytes], bytes]

# A hash is known by its length (the device takes digests, not messages). SHA-1 is
# there because the device takes SHA-1 digests too; signerd never sends one.
_HASHES: dict[int, hashes.HashAlgorithm] = {
    20: hashes.SHA1(),  # noqa: S303
    28: hashes.SHA224(), 32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512(),
}
_MGF1: dict[int, hashes.HashAlgorithm] = {
    Algorithm.RSA_MGF1_SHA1: hashes.SHA1(),  # noqa: S303 - as the device
    Algorithm.RSA_MGF1_SHA256: hashes.SHA256(),
    Algorithm.RSA_MGF1_SHA384: hashes.SHA384(), Algorithm.RSA_MGF1_SHA512: hashes.SHA512(),
}
# DigestInfo prefixes (RFC 8017 §9.2, note 1), by digest length
_DIGEST_INFO = {
    20: bytes.fromhex("3021300906052b0e03021a05000414"),
    32: bytes.fromhex("3031300d060960864801650304020105000420"),
    48: bytes.fromhex("3041300d060960864801650304020205000430"),
    64: bytes.fromhex("3051300d060960864801650304020305000440"),
}
_CREATE = struct.Struct(f">H{LABEL_LENGTH}sHQB")  # id, label, domains, capabilities, algorithm


def _need(session: Session, capability: Capability) -> None:
    if not session.capabilities & bit(capability):
        raise SessionError(Error.INSUFFICIENT_PERMISSIONS)


def _visible(session: Session, obj: Obj) -> bool:
    return bool(session.domains & obj.domains)


def _object(session: Session, store: Store, object_id: int, object_type: int) -> Obj:
    obj = store.get(object_id, object_type)
    if not _visible(session, obj):
        raise SessionError(Error.OBJECT_NOT_FOUND)
    return obj


def _length(data: bytes, *sizes: int) -> None:
    if len(data) not in sizes:
        raise SessionError(Error.WRONG_LENGTH)


def get_storage_info(session: Session, store: Store, data: bytes) -> bytes:
    _length(data, 0)
    used_pages = sum(1 + len(o.value) // 126 for o in store.objects.values())
    return struct.pack(">HHHHH", MAX_OBJECTS, MAX_OBJECTS - len(store.objects), 1024,
                       max(0, 1024 - used_pages), 126)


def get_pseudo_random(session: Session, store: Store, data: bytes) -> bytes:
    _length(data, 2)
    _need(session, Capability.GET_PSEUDO_RANDOM)
    (n,) = struct.unpack(">H", data)
    if n > MAX_MESSAGE - 64:
        raise SessionError(Error.INVALID_DATA)
    return secrets.token_bytes(n)


def _matches(o: Obj, tag: int, raw: bytes) -> bool:
    value = int.from_bytes(raw, "big")
    if tag == 1:
        return o.id == value
    if tag == 2:
        return o.type == value
    if tag == 3:
        return bool(o.domains & value)
    if tag == 4:
        return o.capabilities & value == value
    if tag == 5:
        return o.algorithm == value
    return o.label.rstrip(b"\0") == raw.rstrip(b"\0")


def list_objects(session: Session, store: Store, data: bytes) -> bytes:
    """Filters: 1 ID (2 bytes), 2 type, 3 domains (2), 4 capabilities (8),
    5 algorithm, 6 label (40); an object must match all given."""
    filters: list[tuple[int, bytes]] = []
    sizes = {1: 2, 2: 1, 3: 2, 4: 8, 5: 1, 6: LABEL_LENGTH}
    i = 0
    while i < len(data):
        tag = data[i]
        if tag not in sizes or i + 1 + sizes[tag] > len(data):
            raise SessionError(Error.INVALID_DATA)
        filters.append((tag, data[i + 1:i + 1 + sizes[tag]]))
        i += 1 + sizes[tag]
    found = sorted((o.id, o.type, o.sequence) for o in store.objects.values()
                   if _visible(session, o) and all(_matches(o, t, r) for t, r in filters))
    return b"".join(struct.pack(">HBB", *o) for o in found)


def get_object_info(session: Session, store: Store, data: bytes) -> bytes:
    _length(data, 3)
    object_id, object_type = struct.unpack(">HB", data)
    o = _object(session, store, object_id, object_type)
    size = len(o.private_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)) \
        if o.type == ObjectType.ASYMMETRIC_KEY else o.size
    return struct.pack(f">QHHHBBBB{LABEL_LENGTH}sQ", o.capabilities, o.id, size, o.domains,
                       o.type, o.algorithm, o.sequence, o.origin,
                       o.label.ljust(LABEL_LENGTH, b"\0"), o.delegated)


def _create(data: bytes, minimum: int) -> tuple[int, bytes, int, int, int, bytes]:
    if len(data) < minimum:
        raise SessionError(Error.WRONG_LENGTH)
    object_id, label, domains, capabilities, algorithm = _CREATE.unpack_from(data)
    if domains == 0:
        raise SessionError(Error.INVALID_DATA)
    return object_id, label.rstrip(b"\0"), domains, capabilities, algorithm, \
        data[_CREATE.size:]


def generate_asymmetric_key(session: Session, store: Store, data: bytes) -> bytes:
    _need(session, Capability.GENERATE_ASYMMETRIC_KEY)
    object_id, label, domains, caps, algorithm, rest = _create(data, _CREATE.size)
    if rest or algorithm not in KEY_ALGORITHMS:
        raise SessionError(Error.INVALID_DATA)
    key = generate(algorithm)
    made = store.add(Obj(object_id, ObjectType.ASYMMETRIC_KEY, algorithm, label,
                         domains & session.domains, caps, 0, 0, ORIGIN_GENERATED, der(key)))
    return struct.pack(">H", made)


def put_opaque(session: Session, store: Store, data: bytes) -> bytes:
    _need(session, Capability.PUT_OPAQUE)
    object_id, label, domains, caps, algorithm, value = _create(data, _CREATE.size + 1)
    if algorithm not in (Algorithm.OPAQUE_DATA, Algorithm.OPAQUE_X509_CERTIFICATE):
        raise SessionError(Error.INVALID_DATA)
    made = store.add(Obj(object_id, ObjectType.OPAQUE, algorithm, label,
                         domains & session.domains, caps, 0, 0, ORIGIN_IMPORTED, value))
    return struct.pack(">H", made)


def get_opaque(session: Session, store: Store, data: bytes) -> bytes:
    _length(data, 2)
    _need(session, Capability.GET_OPAQUE)
    return _object(session, store, struct.unpack(">H", data)[0], ObjectType.OPAQUE).value


def delete_object(session: Session, store: Store, data: bytes) -> bytes:
    _length(data, 3)
    object_id, object_type = struct.unpack(">HB", data)
    need = {ObjectType.OPAQUE: Capability.DELETE_OPAQUE,
            ObjectType.ASYMMETRIC_KEY: Capability.DELETE_ASYMMETRIC_KEY}
    if object_type not in need:
        raise SessionError(Error.INVALID_DATA)
    _need(session, need[ObjectType(object_type)])
    _object(session, store, object_id, object_type)
    store.delete(object_id, object_type)
    return b""


def get_public_key(session: Session, store: Store, data: bytes) -> bytes:
    """Algorithm byte, then EC X || Y, an RSA modulus or an Ed25519 point."""
    _length(data, 2, 3)
    if len(data) == 3 and data[2] != ObjectType.ASYMMETRIC_KEY:
        raise SessionError(Error.INVALID_DATA)
    o = _object(session, store, struct.unpack(">H", data[:2])[0], ObjectType.ASYMMETRIC_KEY)
    pub = o.private_key().public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        raw = pub.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint)[1:]
    elif isinstance(pub, rsa.RSAPublicKey):
        raw = pub.public_numbers().n.to_bytes(pub.key_size // 8, "big")
    else:
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bytes([o.algorithm]) + raw


def _signing_key(session: Session, store: Store, data: bytes, capability: Capability) -> Obj:
    if len(data) < 3:
        raise SessionError(Error.WRONG_LENGTH)
    _need(session, capability)
    o = _object(session, store, struct.unpack(">H", data[:2])[0], ObjectType.ASYMMETRIC_KEY)
    if not o.capabilities & bit(capability):
        raise SessionError(Error.INSUFFICIENT_PERMISSIONS)
    return o


def sign_ecdsa(session: Session, store: Store, data: bytes) -> bytes:
    """A DER ECDSA signature over the given digest."""
    key = _signing_key(session, store, data, Capability.SIGN_ECDSA).private_key()
    digest = data[2:]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or len(digest) not in _HASHES:
        raise SessionError(Error.INVALID_DATA)
    return key.sign(digest, ec.ECDSA(Prehashed(_HASHES[len(digest)])))


def sign_eddsa(session: Session, store: Store, data: bytes) -> bytes:
    key = _signing_key(session, store, data, Capability.SIGN_EDDSA).private_key()
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SessionError(Error.INVALID_DATA)
    return key.sign(data[2:])


def _rsa(o: Obj) -> rsa.RSAPrivateKey:
    key = o.private_key()
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SessionError(Error.INVALID_DATA)
    return key


def sign_pss(session: Session, store: Store, data: bytes) -> bytes:
    """Payload: key ID, MGF1 algorithm, salt length (2 bytes), digest."""
    key = _rsa(_signing_key(session, store, data, Capability.SIGN_PSS))
    if len(data) < 5:
        raise SessionError(Error.WRONG_LENGTH)
    mgf, salt = data[2], struct.unpack(">H", data[3:5])[0]
    digest = data[5:]
    if mgf not in _MGF1 or len(digest) not in _HASHES:
        raise SessionError(Error.INVALID_DATA)
    pss = rsa_padding.PSS(rsa_padding.MGF1(_MGF1[mgf]), salt)
    return key.sign(digest, pss, Prehashed(_HASHES[len(digest)]))


def sign_pkcs1(session: Session, store: Store, data: bytes) -> bytes:
    """PKCS#1 v1.5 (RFC 8017 §8.2): a digest of a known length gets its
    DigestInfo; anything else (a DigestInfo already) is padded as it is."""
    key = _rsa(_signing_key(session, store, data, Capability.SIGN_PKCS))
    payload = data[2:]
    for size, prefix in _DIGEST_INFO.items():
        if payload.startswith(prefix) and len(payload) == len(prefix) + size:
            payload = payload[len(prefix):]
    if len(payload) in _DIGEST_INFO:
        return key.sign(payload, rsa_padding.PKCS1v15(), Prehashed(_HASHES[len(payload)]))
    k = key.key_size // 8
    if len(payload) > k - 11:
        raise SessionError(Error.INVALID_DATA)
    em = b"\x00\x01" + b"\xff" * (k - len(payload) - 3) + b"\x00" + payload
    # RSASP1 (RFC 8017 §5.2.1) on a block padded here: cryptography pads only
    # the DigestInfo of a hash it knows, and this input is something else.
    n = key.private_numbers()
    return pow(int.from_bytes(em, "big"), n.d, n.public_numbers.n).to_bytes(k, "big")


HANDLERS: dict[int, Handler] = {
    Command.GET_STORAGE_INFO: get_storage_info,
    Command.GET_PSEUDO_RANDOM: get_pseudo_random,
    Command.LIST_OBJECTS: list_objects,
    Command.GET_OBJECT_INFO: get_object_info,
    Command.GENERATE_ASYMMETRIC_KEY: generate_asymmetric_key,
    Command.PUT_OPAQUE: put_opaque,
    Command.GET_OPAQUE: get_opaque,
    Command.DELETE_OBJECT: delete_object,
    Command.GET_PUBLIC_KEY: get_public_key,
    Command.SIGN_ECDSA: sign_ecdsa,
    Command.SIGN_EDDSA: sign_eddsa,
    Command.SIGN_PSS: sign_pss,
    Command.SIGN_PKCS1: sign_pkcs1,
}
