"""The device's object store: up to 256 objects, kept in a JSON file so that a
device stopped and started again (the tests' unplug and replug) still holds
its keys, as a real one does across a power cycle.

An object is known by its 16-bit ID and its type: a key and an opaque object
may share an ID. Each (ID, type) has a sequence number that grows each time
an object is created under it (the device's "sequence" field).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests._yubihsm._defs import (
    ALL_CAPABILITIES,
    ALL_DOMAINS,
    LABEL_LENGTH,
    MAX_OBJECTS,
    Algorithm,
    Error,
    ObjectType,
)
from tests._yubihsm._scp03 import SessionError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

ORIGIN_GENERATED = 0x01
ORIGIN_IMPORTED = 0x02
DEFAULT_AUTH_LABEL = b"DEFAULT AUTHKEY CHANGE THIS ASAP"


@dataclass
class Obj:
    """One stored object. ``value`` is an opaque object's bytes, an
    authentication key's ENC || MAC, or a private key in PKCS#8 DER."""

    id: int
    type: ObjectType
    algorithm: int
    label: bytes
    domains: int
    capabilities: int
    delegated: int
    sequence: int
    origin: int
    value: bytes

    def private_key(self) -> PrivateKey:
        key = serialization.load_der_private_key(self.value, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                          | ed25519.Ed25519PrivateKey)
        return key

    @property
    def size(self) -> int:
        """The object's length field: bytes of its stored value."""
        return len(self.value)


def generate(algorithm: int) -> PrivateKey:
    """A new private key for a key-generation algorithm; raises SessionError
    (INVALID_DATA) for any other algorithm."""
    if algorithm == Algorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == Algorithm.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == Algorithm.EC_ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    bits: dict[int, int] = {Algorithm.RSA_2048: 2048, Algorithm.RSA_3072: 3072,
                            Algorithm.RSA_4096: 4096}
    if algorithm in bits:
        return rsa.generate_private_key(65537, bits[algorithm])
    raise SessionError(Error.INVALID_DATA)


def der(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Store:
    """The objects of one device, saved to ``path`` after each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.objects: dict[tuple[int, int], Obj] = {}
        self.sequences: dict[tuple[int, int], int] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        for o in data["objects"]:
            obj = Obj(o["id"], ObjectType(o["type"]), o["algorithm"], bytes.fromhex(o["label"]),
                      o["domains"], o["capabilities"], o["delegated"], o["sequence"],
                      o["origin"], bytes.fromhex(o["value"]))
            self.objects[(obj.id, obj.type)] = obj
        self.sequences = {(s[0], s[1]): s[2] for s in data["sequences"]}

    def save(self) -> None:
        objects = [{"id": o.id, "type": int(o.type), "algorithm": o.algorithm,
                    "label": o.label.hex(), "domains": o.domains,
                    "capabilities": o.capabilities, "delegated": o.delegated,
                    "sequence": o.sequence, "origin": o.origin, "value": o.value.hex()}
                   for o in self.objects.values()]
        sequences = [[k[0], k[1], v] for k, v in self.sequences.items()]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"objects": objects, "sequences": sequences}))
        os.replace(tmp, self.path)

    def ensure_default_auth_key(self, enc: bytes, mac: bytes) -> None:
        """Authentication key 1, as the device leaves the factory."""
        if (1, ObjectType.AUTHENTICATION_KEY) not in self.objects:
            self.add(Obj(1, ObjectType.AUTHENTICATION_KEY,
                         Algorithm.AES128_YUBICO_AUTHENTICATION, DEFAULT_AUTH_LABEL,
                         ALL_DOMAINS, ALL_CAPABILITIES, ALL_CAPABILITIES, 0,
                         ORIGIN_IMPORTED, enc + mac))

    def add(self, obj: Obj) -> int:
        """Store ``obj`` (ID 0: the device picks a free one) and return its
        ID; raises SessionError: STORAGE_FAILED when full, OBJECT_EXISTS."""
        if len(self.objects) >= MAX_OBJECTS:
            raise SessionError(Error.STORAGE_FAILED)
        if obj.id == 0:
            while True:  # the device picks a random free ID
                obj.id = secrets.randbelow(0xFFFE) + 1
                if (obj.id, obj.type) not in self.objects:
                    break
        elif (obj.id, obj.type) in self.objects:
            raise SessionError(Error.OBJECT_EXISTS)
        obj.label = obj.label[:LABEL_LENGTH]
        key = (obj.id, int(obj.type))
        obj.sequence = self.sequences.get(key, -1) + 1 & 0xFF
        self.sequences[key] = obj.sequence
        self.objects[(obj.id, obj.type)] = obj
        self.save()
        return obj.id

    def get(self, object_id: int, object_type: int) -> Obj:
        """The object; raises SessionError(OBJECT_NOT_FOUND)."""
        obj = self.objects.get((object_id, object_type))
        if obj is None:
            raise SessionError(Error.OBJECT_NOT_FOUND)
        return obj

    def delete(self, object_id: int, object_type: int) -> None:
        self.get(object_id, object_type)
        del self.objects[(object_id, object_type)]
        self.save()
