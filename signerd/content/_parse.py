"""Payload bytes → the fields the content checks need (no I/O, no state).

Two formats are recognised by the spelling of ``_type``:

- **Notary** (``Root``, ``Targets``, ``Snapshot``, ``Timestamp``): parsed with
  signerd.trust.metadata (notary's structure checks); canonical form is Notary's
  (signerd.canonicaljson, which matches docker/go/canonical/json as notary-server signs).
- **TUF 1.0** (``root``, ``targets``, ``snapshot``, ``timestamp``, with ``spec_version``
  ``1.x``): canonical form is securesystemslib's ``encode_canonical`` (OLPC canonical
  JSON), what python-tuf signs and re-canonicalises to verify. Only the fields the checks
  use are read here (version, expires, meta, targets, delegations): full structural
  validation is the verifier's job, and python-tuf's model would make ``tuf`` a daemon
  dependency for five fields.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from types import MappingProxyType
from typing import Any

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical as olpc_canonical

from signerd.canonicaljson import encode_canonical as notary_canonical
from signerd.content._errors import ContentInvalid
from signerd.errors import InvalidArgument
from signerd.trust import metadata as notary
from signerd.trust.errors import VerificationError


class Format(Enum):
    """Which metadata dialect a payload is, by its ``_type`` spelling."""

    NOTARY = "notary"
    TUF = "tuf"


NOTARY_TYPES = {"Root": "root", "Targets": "targets", "Snapshot": "snapshot",
                "Timestamp": "timestamp"}
TUF_TYPES = {"root": "root", "targets": "targets", "snapshot": "snapshot",
             "timestamp": "timestamp"}
_TUF_EXPIRES = "%Y-%m-%dT%H:%M:%SZ"  # python-tuf's Signed._common_fields_from_dict


@dataclass(frozen=True)
class Delegation:
    """Which targets a delegated role may list, as its parent's metadata says.

    Notary: ``paths`` are prefixes (notary's checkPaths; ``""`` allows all). TUF 1.0:
    ``paths`` are patterns matched segment by segment with fnmatch, or
    ``path_hash_prefixes`` of the target path's SHA-256 hex (TUF spec §4.5 "delegations";
    python-tuf's DelegatedRole.is_delegated_path).
    """

    format: Format
    paths: tuple[str, ...] = ()
    path_hash_prefixes: tuple[str, ...] = ()

    def allows(self, target: str) -> bool:
        """True if ``target`` is inside the delegation."""
        if self.format is Format.NOTARY:
            return any(target.startswith(p) for p in self.paths)
        if self.path_hash_prefixes:
            digest = hashlib.sha256(target.encode()).hexdigest()
            return any(digest.startswith(p) for p in self.path_hash_prefixes)
        parts = target.split("/")
        for pattern in self.paths:
            pat = pattern.split("/")
            if len(pat) == len(parts) and all(
                fnmatch.fnmatchcase(t, p) for t, p in zip(parts, pat, strict=True)
            ):
                return True
        return False

    def to_json(self) -> str:
        """The stored form (the watermark store keeps it as text)."""
        return json.dumps({"format": self.format.value, "paths": list(self.paths),
                           "path_hash_prefixes": list(self.path_hash_prefixes)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Delegation:
        """The inverse of to_json."""
        raw = json.loads(text)
        return cls(Format(raw["format"]), tuple(raw["paths"]), tuple(raw["path_hash_prefixes"]))


@dataclass(frozen=True)
class MetaRef:
    """One entry of a snapshot's or timestamp's ``meta``.

    ``role`` is the signerd role of the referenced file (``targets/releases`` for Notary's
    ``targets/releases`` and TUF's ``releases.json``); ``version`` is TUF's, ``sha256``
    the hex hash (Notary always, TUF when hashes are given).
    """

    name: str
    role: str
    version: int | None
    sha256: str | None


@dataclass(frozen=True)
class Parsed:
    """The parsed ``signed`` object: ``type`` is the role its ``_type`` names (lower case)."""

    format: Format
    type: str
    version: int
    expires: datetime
    digest: str  # SHA-256 hex of the payload
    meta: tuple[MetaRef, ...] = ()
    targets: tuple[str, ...] = ()
    delegations: Mapping[str, Delegation] = field(  # signerd role → paths
        default_factory=lambda: MappingProxyType({}))


def _invalid(check: str, message: str) -> ContentInvalid:
    return ContentInvalid(check, message)


# What a caller who signed a file with a metadata key should do instead (a new user's
# first try: signerctl's first key is a metadata key).
_RAW_HINT = ("; a metadata key signs only TUF or Notary metadata: use a key of purpose raw "
             "for other bytes")


def _json(payload: bytes) -> dict[str, Any]:
    try:
        # strict=False: OLPC canonical JSON (TUF's) leaves control characters such as the
        # newlines of a PEM key unescaped inside strings. Notary's form escapes them, and a
        # Notary payload that does not is refused by the canonical check.
        value = json.loads(payload, strict=False)
    except UnicodeDecodeError:
        raise _invalid("json", "payload is not JSON metadata (not UTF-8)" + _RAW_HINT) from None
    except ValueError as e:
        raise _invalid("json", f"payload is not JSON metadata ({e})" + _RAW_HINT) from None
    except RecursionError:
        raise _invalid("json", "payload is not JSON metadata: nested too deeply") from None
    if not isinstance(value, dict) or not isinstance(value.get("_type"), str):
        raise _invalid("json", "payload is not a TUF or Notary 'signed' object (no _type)")
    return value


def _canonical(value: dict[str, Any], fmt: Format) -> bytes:
    try:
        if fmt is Format.NOTARY:
            return notary_canonical(value)
        text = olpc_canonical(value)
        assert isinstance(text, str)
        return text.encode("utf-8")
    except InvalidArgument as e:  # signerd's messages are short
        raise _invalid("canonical", f"payload cannot be canonical JSON: {e}") from None
    except (FormatError, UnicodeEncodeError):  # securesystemslib's quote the whole object
        raise _invalid("canonical", "payload cannot be canonical JSON: it holds a float "
                                    "or a string that is not valid Unicode") from None
    except RecursionError:
        raise _invalid("canonical", "payload is nested too deeply to canonicalise") from None


def _tuf_meta_role(name: str) -> str:
    stem = name.removesuffix(".json")
    return stem if stem in ("root", "targets", "snapshot", "timestamp") else f"targets/{stem}"


# The largest version any client holds: notary and go-tuf read versions as Go's int64, and
# the watermark stores keep them in a 64-bit column (PostgreSQL BIGINT, SQLite INTEGER).
MAX_VERSION = 2**63 - 1


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_VERSION:
        raise _invalid("structure", f"{what} must be a whole number from 1 to 2^63-1")
    return value


# The field names of the structures notary (Go) and go-tuf decode metadata into. Go's
# encoding/json matches an object's keys to these without regard to case, Unicode simple
# folding included ("expireſ", U+017F, and "EXPIRES" both fill Expires; the last such key
# wins), while signerd reads the exact names. A payload with such a spelling would be
# checked under one reading and trusted under another, so it is refused. Objects that
# Go decodes as maps (target names, meta file names, key IDs, role names, hash names) keep
# their keys as they are, and "custom" is opaque: neither is matched.
# Sources: notary tuf/data/{types,root,targets,snapshot,timestamp}.go; go-tuf data/types.go.
_STRUCT_FIELDS = frozenset({
    "_type", "spec_version", "version", "expires", "consistent_snapshot", "keys", "roles",
    "targets", "delegations", "meta", "length", "hashes", "custom", "keyids", "threshold",
    "name", "paths", "path_hash_prefixes", "terminating", "keytype", "keyval", "public",
    "private", "scheme", "keyid_hash_algorithms",
})
_MAPS = frozenset({"targets", "meta", "keys", "hashes"})  # keys are names, values structs


def _check_spelling(value: Any, *, is_map: bool = False, depth: int = 0) -> None:
    """Refuse a key of a struct-shaped object that Go would read as a field signerd reads
    under another spelling (see _STRUCT_FIELDS). Raises ContentInvalid."""
    if depth > 32:  # canonicalisation has refused anything deeper that matters
        return
    if isinstance(value, list):
        for item in value:
            _check_spelling(item, depth=depth + 1)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if not is_map:
            folded = key.casefold()
            if folded in _STRUCT_FIELDS and key != folded:
                raise _invalid("structure", f"key {key[:32]!r} is another spelling of "
                                            f"{folded!r}, which Go clients would read as it")
            if key == "custom":
                continue
            # "roles" is a map in root and a list in delegations: both are walked.
            _check_spelling(item, is_map=key in _MAPS or key == "roles", depth=depth + 1)
        else:
            _check_spelling(item, depth=depth + 1)  # a map's values are structs


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid("structure", f"{what} must be a list of strings")
    return tuple(value)


def _parse_tuf(value: dict[str, Any], typ: str, role: str, digest: str) -> Parsed:
    spec = value.get("spec_version")
    if not isinstance(spec, str) or spec.split(".")[0] != "1":
        raise _invalid("structure", "TUF metadata needs spec_version 1.x")
    version = _int(value.get("version"), "version")
    try:
        expires = datetime.strptime(str(value.get("expires")), _TUF_EXPIRES).replace(tzinfo=UTC)
    except ValueError:
        raise _invalid("structure", "expires must be YYYY-MM-DDTHH:MM:SSZ") from None
    meta: list[MetaRef] = []
    targets: tuple[str, ...] = ()
    delegations: dict[str, Delegation] = {}
    if typ in ("snapshot", "timestamp"):
        raw = value.get("meta")
        if not isinstance(raw, dict):
            raise _invalid("structure", f"{typ} needs a 'meta' object")
        for name, entry in raw.items():
            if not isinstance(entry, dict):
                raise _invalid("structure", f"meta {name!r} must be an object")
            hashes = entry.get("hashes")
            sha = hashes.get("sha256") if isinstance(hashes, dict) else None
            meta.append(MetaRef(name, _tuf_meta_role(name),
                                _int(entry.get("version"), f"meta {name!r} version"),
                                sha if isinstance(sha, str) else None))
    elif typ == "targets":
        raw = value.get("targets")
        if not isinstance(raw, dict):
            raise _invalid("structure", "targets needs a 'targets' object")
        targets = tuple(raw)
        dele = value.get("delegations")
        roles = dele.get("roles", []) if isinstance(dele, dict) else []
        if dele is not None and not isinstance(roles, list):
            raise _invalid("structure", "delegations.roles must be a list")
        for entry in roles:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise _invalid("structure", "every delegated role needs a name")
            child = Delegation(
                Format.TUF,
                _strings(entry.get("paths", []), f"delegation {name!r} paths"),
                _strings(entry.get("path_hash_prefixes", []),
                         f"delegation {name!r} path_hash_prefixes"),
            )
            # TUF's delegated role names are flat (targets/ci's child "x" is "x", like
            # targets' child "ci"), so signerd cannot tell from a name who may set its
            # paths. Only the top-level targets role's delegations are recorded: a
            # delegated key must not (re)define its own paths or a sibling's. Deeper TUF
            # delegations are checked against no recorded paths (README, known limits).
            if role == "targets":
                delegations[f"targets/{name}"] = child
    return Parsed(Format.TUF, typ, version, expires, digest, tuple(meta), targets,
                  MappingProxyType(delegations))


def _parse_notary(value: dict[str, Any], typ: str, role: str, digest: str) -> Parsed:
    # A Targets payload is parsed as the key's delegation when the key is one, so that
    # notary's "children sit under their parent" rule names the right file.
    file_role = role if typ == "targets" and role.startswith("targets/") else typ
    try:
        signed = notary.parse_signed(file_role, value)
    except VerificationError as e:
        raise _invalid("structure", f"not valid Notary metadata: {e}") from None
    _int(signed.version, "version")
    meta: tuple[MetaRef, ...] = ()
    targets: tuple[str, ...] = ()
    delegations: dict[str, Delegation] = {}
    if isinstance(signed, notary.Snapshot | notary.Timestamp):
        meta = tuple(
            MetaRef(name, name, None, m.hashes["sha256"].hex() if "sha256" in m.hashes else None)
            for name, m in signed.meta.items()
        )
    elif isinstance(signed, notary.Targets):
        targets = tuple(signed.targets)
        delegations = {d.name: Delegation(Format.NOTARY, tuple(d.paths))
                       for d in signed.delegations}
    return Parsed(Format.NOTARY, typ, signed.version, signed.expires, digest, meta, targets,
                  MappingProxyType(delegations))


def parse_payload(payload: bytes, role: str) -> Parsed:
    """Parse ``payload`` (the bytes to be signed) for a key of ``role``.

    Raises ContentInvalid (an InvalidArgument) with ``check`` ``json`` (not a JSON object
    with a ``_type``), ``type`` (a ``_type`` of neither format), ``canonical`` (the bytes
    are not the canonical JSON of what they parse to, under their format's rules) or
    ``structure`` (a field the checks need is missing or malformed).
    """
    value = _json(payload)
    typ_text = value["_type"]
    if typ_text in NOTARY_TYPES:
        fmt, typ = Format.NOTARY, NOTARY_TYPES[typ_text]
    elif typ_text in TUF_TYPES:
        fmt, typ = Format.TUF, TUF_TYPES[typ_text]
    else:
        raise _invalid("type", f"_type {typ_text[:32]!r} is not a TUF or Notary role")
    if _canonical(value, fmt) != payload:
        rules = "Notary's" if fmt is Format.NOTARY else "TUF's (OLPC)"
        raise _invalid("canonical", f"payload is not canonical JSON under {rules} rules")
    _check_spelling(value)
    digest = hashlib.sha256(payload).hexdigest()
    if fmt is Format.TUF:
        return _parse_tuf(value, typ, role, digest)
    return _parse_notary(value, typ, role, digest)
