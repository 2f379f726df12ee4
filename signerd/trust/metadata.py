"""Notary's TUF metadata: the four roles, delegated targets roles, and the signed envelope.

Shapes follow notary's tuf/data/{root,targets,snapshot,timestamp,types}.go.
Every model keeps fields it does not know in ``extra`` so that re-signing a
file written by another Notary client loses nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

from signerd.canonicaljson import encode_canonical
from signerd.errors import InvalidArgument, quoted
from signerd.keys import validate_role
from signerd.trust._key import TufKey
from signerd.trust.errors import UnwritableValue, VerificationError
from signerd.trust.signer import TrustSigner

# Go's notary.Year is 365 days; these are notary.Notary*Expiry (const.go).
DAY = timedelta(days=1)
YEAR = 365 * DAY
DEFAULT_EXPIRY: dict[str, timedelta] = {
    "root": 10 * YEAR,
    "targets": 3 * YEAR,
    "snapshot": 3 * YEAR,
    "timestamp": 14 * DAY,
}
BASE_ROLES = ("root", "targets", "snapshot", "timestamp")
# Snapshot and timestamp meta carry both, as notary's NotaryDefaultHashes do.
META_HASHES = ("sha256", "sha512")
_HASH_SIZES = {"sha256": 32, "sha512": 64}

Json = dict[str, Any]


# --- time -------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


def format_expires(when: datetime) -> str:
    """RFC 3339 in UTC, whole seconds, as Go marshals a time: ``2036-11-28T16:00:00Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expires(text: str) -> datetime:
    """Parse Go's RFC 3339 (nanoseconds and offsets allowed, as other clients write them)."""
    m = _RFC3339.match(text)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m.group(7) or "0").ljust(9, "0")[:6])  # Python keeps microseconds only
    zone = m.group(8)
    offset = timedelta(0)
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    local = datetime(year, month, day, hour, minute, second, micros, tzinfo=UTC)
    try:
        return local - offset
    except OverflowError:
        # Valid RFC 3339 whose UTC time lies outside Python's years 1-9999
        # ("9999-12-31T23:59:59-01:00" is in the year 10000). Go's time holds
        # it, so notary compares it; only the order against now matters here.
        return datetime.max.replace(tzinfo=UTC) if offset < timedelta(0) else datetime.min.replace(
            tzinfo=UTC
        )


def default_expires(role: str, now: datetime | None = None) -> datetime:
    """Notary's default expiry for ``role`` (delegations use the targets one)."""
    base = now or datetime.now(UTC)
    return base + DEFAULT_EXPIRY["targets" if role.startswith("targets/") else role]


# --- parsing helpers: every error names the file ------------------------------

_T = TypeVar("_T")


def _get(obj: Any, key: str, kind: type[_T], role: str) -> _T:
    if not isinstance(obj, dict) or key not in obj:
        raise VerificationError(role, f"missing {key!r}")
    value = obj[key]
    # bool is an int in Python; JSON true is never a version or a length.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise VerificationError(role, f"{key!r} must be {kind.__name__}")
    return value


def _b64(text: Any, role: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(role, f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise VerificationError(role, f"{what} is not valid base64") from None
    # Refuse non-canonical base64 (stray padding bits), so that every byte of a
    # file matters; encoders, Go's included, never write it.
    if base64.b64encode(raw).decode() != text:
        raise VerificationError(role, f"{what} is not canonical base64")
    return raw


def _extra(obj: Json, known: tuple[str, ...]) -> Json:
    return {k: v for k, v in obj.items() if k not in known}


# --- strings signerctl writes ---------------------------------------------------


def unwritable_reason(text: str) -> str | None:
    """Why ``text`` cannot go into metadata, or None if it can.

    Canonical JSON (signerd's and notary's) writes control characters raw,
    which makes the file invalid JSON; a lone surrogate is not UTF-8 at all.
    """
    for c in text:
        if ord(c) < 0x20:
            return f"control character U+{ord(c):04X}"
        if 0xD800 <= ord(c) <= 0xDFFF:
            return "a character that is not valid UTF-8"
    return None


def check_writable(value: Any, role: str, what: str = "value") -> None:
    """Raise UnwritableValue(role) if any string in ``value`` (keys too) cannot be written."""
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            reason = unwritable_reason(item)
            if reason is not None:
                raise UnwritableValue(role, f"{where} {quoted(item)} contains {reason}")
        elif isinstance(item, dict):
            stack += [(k, f"{where} key") for k in item]
            stack += [(v, f"{where} {quoted(k)}" if isinstance(k, str) else where)
                      for k, v in item.items()]
        elif isinstance(item, list | tuple):
            stack += [(v, where) for v in item]


# --- file meta ----------------------------------------------------------------


@dataclass
class FileMeta:
    """Length and hashes of a file: a target, or a metadata file in snapshot/timestamp."""

    length: int
    hashes: dict[str, bytes]
    custom: Any = None  # opaque; docker writes none, other notary clients may

    @classmethod
    def for_bytes(cls, data: bytes, algorithms: tuple[str, ...] = META_HASHES) -> FileMeta:
        """Meta for ``data`` with the given hash algorithms."""
        return cls(len(data), {a: hashlib.new(a, data).digest() for a in algorithms})

    def to_dict(self) -> Json:
        """The JSON form: ``{"hashes": {ALG: base64}, "length": N}``."""
        out: Json = {
            "hashes": {k: base64.b64encode(v).decode() for k, v in self.hashes.items()},
            "length": self.length,
        }
        if self.custom is not None:
            out["custom"] = self.custom
        return out

    @classmethod
    def from_dict(cls, value: Any, role: str, what: str) -> FileMeta:
        """Parse; ``role`` is the file being read, ``what`` the entry (for messages)."""
        length = _get(value, "length", int, role)
        raw = _get(value, "hashes", dict, role)
        hashes = {str(k): _b64(v, role, f"{what} {k} hash") for k, v in raw.items()}
        return cls(length, hashes, value.get("custom"))

    def check(self, data: bytes, role: str) -> None:
        """Raise VerificationError(role) unless ``data`` has this length and every known hash.

        At least sha256 must be present: notary requires it for metadata meta.
        """
        if "sha256" not in self.hashes:
            raise VerificationError(role, "no sha256 hash recorded for this file")
        if len(data) != self.length:
            raise VerificationError(role, f"length {len(data)} is not the expected {self.length}")
        for name, expected in self.hashes.items():
            if name in _HASH_SIZES and hashlib.new(name, data).digest() != expected:
                raise VerificationError(role, f"{name} hash does not match")


# --- roles ----------------------------------------------------------------------


@dataclass
class RoleKeys:
    """A role's key IDs and signature threshold (notary's RootRole)."""

    keyids: list[str]
    threshold: int = 1

    def to_dict(self) -> Json:
        """The JSON form in root.json's ``roles``."""
        return {"keyids": list(self.keyids), "threshold": self.threshold}


@dataclass
class DelegatedRole:
    """A delegation entry in a targets file: ``targets/NAME`` with keys and paths."""

    name: str
    keyids: list[str]
    threshold: int = 1
    paths: list[str] = field(default_factory=lambda: [""])

    def to_dict(self) -> Json:
        """The JSON form in a targets file's ``delegations.roles``."""
        out: Json = {"keyids": list(self.keyids), "name": self.name, "threshold": self.threshold}
        if self.paths:  # `paths,omitempty` in notary's Role
            out["paths"] = list(self.paths)
        return out

    def allows(self, target: str) -> bool:
        """True if ``target`` falls under one of the path prefixes (notary's checkPaths)."""
        return any(target.startswith(p) for p in self.paths)


def _role_keys(value: Any, role: str, where: str) -> tuple[list[str], int]:
    keyids = _get(value, "keyids", list, role)
    if not all(isinstance(k, str) for k in keyids):
        raise VerificationError(role, f"{where} keyids must be strings")
    threshold = _get(value, "threshold", int, role)
    if threshold < 1:
        raise VerificationError(role, f"{where} threshold must be at least 1")
    return list(keyids), threshold


def _keys(value: Any, role: str) -> dict[str, TufKey]:
    if not isinstance(value, dict):
        raise VerificationError(role, "'keys' must be an object")
    out: dict[str, TufKey] = {}
    for kid, raw in value.items():
        try:
            out[kid] = TufKey.from_dict(raw)
        except InvalidArgument as e:
            raise VerificationError(role, f"key {kid}: {e}") from None
    return out


@dataclass(kw_only=True)
class Signed:
    """Fields common to every role (notary's SignedCommon)."""

    TYPE: ClassVar[str] = ""
    _KNOWN: ClassVar[tuple[str, ...]] = ("_type", "expires", "version")
    version: int
    expires: datetime
    extra: Json = field(default_factory=dict)

    def to_dict(self) -> Json:
        """The ``signed`` object as Notary writes it."""
        out: Json = dict(self.extra)
        out.update(
            {"_type": self.TYPE, "expires": format_expires(self.expires), "version": self.version}
        )
        out.update(self._body())
        return out

    def _body(self) -> Json:
        raise NotImplementedError

    @classmethod
    def _common(cls, value: Any, role: str) -> tuple[int, datetime]:
        if not isinstance(value, dict):
            raise VerificationError(role, "'signed' must be an object")
        typ = value.get("_type")
        if typ != cls.TYPE:
            raise VerificationError(role, f"_type is {typ!r}, expected {cls.TYPE!r}")
        version = _get(value, "version", int, role)
        if version < 1:
            raise VerificationError(role, "version must be at least 1")
        try:
            expires = parse_expires(_get(value, "expires", str, role))
        except ValueError as e:
            raise VerificationError(role, str(e)) from None
        return version, expires

    def is_expired(self, now: datetime) -> bool:
        """True once ``now`` is past the expiry (notary's IsExpired)."""
        return self.expires < now


@dataclass(kw_only=True)
class Root(Signed):
    """root.json: all keys of the base roles, and which key IDs each role uses."""

    TYPE: ClassVar[str] = "Root"
    _KNOWN: ClassVar[tuple[str, ...]] = Signed._KNOWN + ("keys", "roles", "consistent_snapshot")
    keys: dict[str, TufKey]
    roles: dict[str, RoleKeys]
    consistent_snapshot: bool = False

    def _body(self) -> Json:
        return {
            "consistent_snapshot": self.consistent_snapshot,
            "keys": {kid: k.to_dict() for kid, k in self.keys.items()},
            "roles": {name: r.to_dict() for name, r in self.roles.items()},
        }

    def role_keys(self, role: str) -> dict[str, TufKey]:
        """Key ID → key for a base role."""
        return {kid: self.keys[kid] for kid in self.roles[role].keyids if kid in self.keys}

    @classmethod
    def from_dict(cls, value: Any, role: str = "root") -> Root:
        """Parse and check the structure (notary's isValidRootStructure)."""
        version, expires = cls._common(value, role)
        keys = _keys(_get(value, "keys", dict, role), role)
        roles: dict[str, RoleKeys] = {}
        for name, raw in _get(value, "roles", dict, role).items():
            keyids, threshold = _role_keys(raw, role, f"role {name}")
            roles[name] = RoleKeys(keyids, threshold)
        for name in BASE_ROLES:
            if name not in roles:
                raise VerificationError(role, f"missing {name} role")
            for kid in roles[name].keyids:
                if kid not in keys:
                    raise VerificationError(role, f"{name} lists key {kid} that is not in 'keys'")
        consistent = value.get("consistent_snapshot", False)
        if not isinstance(consistent, bool):
            raise VerificationError(role, "'consistent_snapshot' must be a boolean")
        return cls(
            version=version,
            expires=expires,
            keys=keys,
            roles=roles,
            consistent_snapshot=consistent,
            extra=_extra(value, cls._KNOWN),
        )


@dataclass(kw_only=True)
class Targets(Signed):
    """targets.json or a delegation ``targets/NAME.json``."""

    TYPE: ClassVar[str] = "Targets"
    _KNOWN: ClassVar[tuple[str, ...]] = Signed._KNOWN + ("targets", "delegations")
    targets: dict[str, FileMeta] = field(default_factory=dict)
    delegation_keys: dict[str, TufKey] = field(default_factory=dict)
    delegations: list[DelegatedRole] = field(default_factory=list)

    def _body(self) -> Json:
        return {
            "delegations": {
                "keys": {kid: k.to_dict() for kid, k in self.delegation_keys.items()},
                "roles": [r.to_dict() for r in self.delegations],
            },
            "targets": {name: m.to_dict() for name, m in self.targets.items()},
        }

    def delegation(self, name: str) -> DelegatedRole | None:
        """The delegation entry called ``name``, if any."""
        return next((d for d in self.delegations if d.name == name), None)

    def delegation_role_keys(self, name: str) -> dict[str, TufKey]:
        """Key ID → key for the delegation ``name`` (empty if unknown)."""
        d = self.delegation(name)
        if d is None:
            return {}
        return {kid: self.delegation_keys[kid] for kid in d.keyids if kid in self.delegation_keys}

    @classmethod
    def from_dict(cls, value: Any, role: str = "targets") -> Targets:
        """Parse and check the structure (notary's isValidTargetsStructure)."""
        version, expires = cls._common(value, role)
        targets = {
            str(name): FileMeta.from_dict(meta, role, f"target {name!r}")
            for name, meta in _get(value, "targets", dict, role).items()
        }
        raw_del = value.get("delegations", {"keys": {}, "roles": []})
        keys = _keys(raw_del.get("keys", {}) if isinstance(raw_del, dict) else None, role)
        roles: list[DelegatedRole] = []
        for raw in _get(raw_del, "roles", list, role):
            name = _get(raw, "name", str, role)
            try:
                validate_role(name)  # Notary's delegation names: [-a-z0-9_/]
            except InvalidArgument:
                raise VerificationError(
                    role, f"delegation name {quoted(name)} is not a valid Notary role name"
                ) from None
            # Children must sit directly under this role (targets/a → targets/a/b).
            if name.rsplit("/", 1)[0] != role or not name.startswith("targets/"):
                raise VerificationError(role, f"delegation {name!r} is not a child of {role}")
            keyids, threshold = _role_keys(raw, role, f"delegation {name}")
            for kid in keyids:
                if kid not in keys:
                    raise VerificationError(role, f"delegation {name} lists unknown key {kid}")
            paths = raw.get("paths", [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise VerificationError(role, f"delegation {name} paths must be strings")
            roles.append(DelegatedRole(name, keyids, threshold, list(paths)))
        return cls(
            version=version,
            expires=expires,
            targets=targets,
            delegation_keys=keys,
            delegations=roles,
            extra=_extra(value, cls._KNOWN),
        )


@dataclass(kw_only=True)
class _MetaRole(Signed):
    _KNOWN: ClassVar[tuple[str, ...]] = Signed._KNOWN + ("meta",)
    _REQUIRED: ClassVar[tuple[str, ...]] = ()
    meta: dict[str, FileMeta] = field(default_factory=dict)

    def _body(self) -> Json:
        return {"meta": {name: m.to_dict() for name, m in self.meta.items()}}

    @classmethod
    def _parse(cls, value: Any, role: str) -> tuple[int, datetime, dict[str, FileMeta]]:
        version, expires = cls._common(value, role)
        meta = {
            str(name): FileMeta.from_dict(m, role, f"meta {name!r}")
            for name, m in _get(value, "meta", dict, role).items()
        }
        for name in cls._REQUIRED:
            if "sha256" not in meta.get(name, FileMeta(0, {})).hashes:
                raise VerificationError(role, f"missing {name} sha256 checksum information")
        return version, expires, meta


@dataclass(kw_only=True)
class Snapshot(_MetaRole):
    """snapshot.json: lengths and hashes of root, targets and every delegation file."""

    TYPE: ClassVar[str] = "Snapshot"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("root", "targets")

    @classmethod
    def from_dict(cls, value: Any, role: str = "snapshot") -> Snapshot:
        """Parse and check the structure (notary's IsValidSnapshotStructure)."""
        version, expires, meta = cls._parse(value, role)
        return cls(version=version, expires=expires, meta=meta, extra=_extra(value, cls._KNOWN))


@dataclass(kw_only=True)
class Timestamp(_MetaRole):
    """timestamp.json: length and hashes of snapshot.json."""

    TYPE: ClassVar[str] = "Timestamp"
    _REQUIRED: ClassVar[tuple[str, ...]] = ("snapshot",)

    @classmethod
    def from_dict(cls, value: Any, role: str = "timestamp") -> Timestamp:
        """Parse and check the structure (notary's IsValidTimestampStructure)."""
        version, expires, meta = cls._parse(value, role)
        return cls(version=version, expires=expires, meta=meta, extra=_extra(value, cls._KNOWN))


def parse_signed(role: str, value: Any) -> Root | Targets | Snapshot | Timestamp:
    """Parse the ``signed`` object of the file for ``role``."""
    if role == "root":
        return Root.from_dict(value, role)
    if role == "snapshot":
        return Snapshot.from_dict(value, role)
    if role == "timestamp":
        return Timestamp.from_dict(value, role)
    if role == "targets" or role.startswith("targets/"):
        return Targets.from_dict(value, role)
    raise VerificationError(role, "unknown role")


# --- envelope -------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One entry of ``signatures``: key ID as listed in the metadata, method, raw bytes."""

    keyid: str
    method: str
    sig: bytes

    def to_dict(self) -> Json:
        """The JSON form, signature in standard base64."""
        sig = base64.b64encode(self.sig).decode()
        return {"keyid": self.keyid, "method": self.method, "sig": sig}


# Go's json.Marshal (which notary uses for the envelope) escapes these inside
# strings even in an already-canonical RawMessage; do the same so files match.
_GO_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def file_bytes(signed: bytes, signatures: Sequence[Signature]) -> bytes:
    """The metadata file notary writes (json.Marshal of data.Signed) for ``signed``, the
    canonical JSON of a ``signed`` object, and ``signatures``.

    ``signed`` comes first as given, then ``signatures`` with keyid, method, sig in struct
    order; Go's HTML escapes are applied.
    """
    body = signed
    for raw, escaped in _GO_ESCAPES:
        body = body.replace(raw, escaped)
    sigs = b",".join(
        b'{"keyid":' + json.dumps(s.keyid).encode()
        + b',"method":' + json.dumps(s.method).encode()
        + b',"sig":"' + base64.b64encode(s.sig) + b'"}'
        for s in signatures
    )
    return b'{"signed":' + body + b',"signatures":[' + sigs + b"]}"


@dataclass
class Envelope:
    """A metadata file: ``{"signed": ..., "signatures": [...]}``."""

    signed: Json
    signatures: list[Signature]

    def message(self) -> bytes:
        """The bytes signatures cover: canonical JSON of ``signed``."""
        return encode_canonical(self.signed)

    def to_bytes(self) -> bytes:
        """The file as notary writes it (json.Marshal of data.Signed).

        ``signed`` comes first as its canonical form, then ``signatures`` with
        keyid, method, sig in struct order; Go's HTML escapes are applied.
        """
        return file_bytes(encode_canonical(self.signed), self.signatures)

    @classmethod
    def from_bytes(cls, data: bytes, role: str) -> Envelope:
        """Parse a metadata file; raises VerificationError naming ``role``'s file."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise VerificationError(role, f"not valid JSON: {e}") from None
        except RecursionError:
            raise VerificationError(role, "not valid JSON: nested too deeply") from None
        if not isinstance(doc, dict):
            raise VerificationError(role, "not a signed metadata object")
        signed = _get(doc, "signed", dict, role)
        sigs: list[Signature] = []
        for raw in _get(doc, "signatures", list, role):
            keyid = _get(raw, "keyid", str, role)
            # Notary lower-cases the method on read; signerd takes it as written
            # (every writer uses lower case) so that no byte of a file is slack.
            method = _get(raw, "method", str, role)
            sigs.append(Signature(keyid, method, _b64(raw.get("sig"), role, "signature")))
        try:
            encode_canonical(signed)
        except InvalidArgument as e:  # floats: notary cannot canonicalise them either
            raise VerificationError(role, str(e)) from None
        except RecursionError:
            raise VerificationError(role, "nested too deeply to canonicalise") from None
        return cls(signed, sigs)

    def valid_keyids(self, keys: Mapping[str, TufKey]) -> set[str]:
        """Key IDs in ``keys`` whose signature here verifies (notary's VerifySignatures).

        A signature counts only if its key ID is listed and equals the ID of
        the key it names, and the signature verifies over the canonical bytes.
        """
        message = self.message()
        valid: set[str] = set()
        for s in self.signatures:
            key = keys.get(s.keyid)
            if key is not None and key.key_id == s.keyid and key.verify(s.method, s.sig, message):
                valid.add(s.keyid)
        return valid

    def check_threshold(self, keys: Mapping[str, TufKey], threshold: int, role: str) -> None:
        """Raise VerificationError(role) unless ``threshold`` distinct listed keys signed."""
        if not self.signatures:
            raise VerificationError(role, "no signatures")
        got = len(self.valid_keyids(keys))
        if got < threshold:
            raise VerificationError(
                role, f"valid signatures from {got} of the role's keys, {threshold} required"
            )


def sign_envelope(signed: Signed | Json, signers: Mapping[str, TrustSigner]) -> Envelope:
    """Sign ``signed`` with each signer, keyed by the key ID the metadata lists for it.

    For a root key that ID is the x509 key's ID, not the signer's canonical
    ``key_id`` (notary's tuf/signed/sign.go makes the same translation).
    """
    body = signed.to_dict() if isinstance(signed, Signed) else signed
    message = encode_canonical(body)
    sigs = [Signature(kid, s.method, s.sign(message)) for kid, s in sorted(signers.items())]
    return Envelope(body, sigs)
