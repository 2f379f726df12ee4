"""Verify a repository's trust data the way a Content Trust client does.

Order and checks follow notary's client (client/tufclient.go, tuf/builder.go,
trustpinning/certs.go): root first, signed by a threshold of its own root keys
whose certificates name the GUN and are valid, and by the previously trusted
root's keys if there is one; then timestamp → snapshot → targets →
delegations, each checked for signatures, the hash and length recorded by the
file above it, a version no lower than the trusted one, and expiry.

Unlike the notary client, which skips a delegation that fails, any failure
here raises :class:`VerificationError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from signerd.errors import InvalidArgument
from signerd.trust._key import TufKey
from signerd.trust.errors import UnsignedTag, VerificationError
from signerd.trust.metadata import (
    DelegatedRole,
    Envelope,
    FileMeta,
    Root,
    Signed,
    Snapshot,
    Targets,
    Timestamp,
)
from signerd.trust.x509 import root_certificate_key

# Where `docker pull` looks first; a tag signed in several roles resolves here.
TAG_ROLE_PREFERENCE = ("targets/releases", "targets")


@dataclass(frozen=True)
class SignedTag:
    """A tag a Content Trust client would accept, and the role that signed it."""

    name: str
    digest: str  # hex SHA-256 of the manifest
    size: int
    role: str

    def to_dict(self) -> dict[str, Any]:
        """Machine output (``--json``). ``digest`` is ``sha256:HEX``, as Docker
        writes a digest, as ``trust sign --digest`` takes it and as the table
        shows it (issue 21 §6: JSON had the bare hex)."""
        return {"name": self.name, "digest": f"sha256:{self.digest}", "size": self.size,
                "role": self.role}


@dataclass(frozen=True)
class TrustedState:
    """What a client remembers between verifications, to refuse rollbacks.

    ``versions`` maps role names to the highest version trusted so far;
    ``root`` is the last trusted root.json, whose keys must sign a newer root.
    """

    versions: Mapping[str, int] = field(default_factory=dict)
    root: bytes | None = None

    def to_json(self) -> bytes:
        """Serialise for storage next to the trust data."""
        doc = {"versions": dict(self.versions), "root": self.root.decode() if self.root else None}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TrustedState:
        """Inverse of :meth:`to_json`; raises InvalidArgument if ``data`` is not one."""
        try:
            doc = json.loads(data)
            root = doc.get("root")
            versions = {str(k): int(v) for k, v in doc["versions"].items()}
            return cls(versions, root.encode() if root else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgument(f"not a saved trust state: {e}") from None


@dataclass(frozen=True)
class VerifiedRepository:
    """The result of a successful verification."""

    gun: str
    tags: tuple[SignedTag, ...]  # one entry per (role, tag), sorted by tag then preference
    state: TrustedState  # to pass as ``trusted`` next time
    root: Root
    targets: Mapping[str, Targets]

    def tag(self, name: str) -> SignedTag:
        """The signed tag ``name`` as Docker resolves it; raises UnsignedTag if there is none."""
        for t in self.tags:
            if t.name == name:
                return t
        raise UnsignedTag(f"{self.gun}:{name} is not signed by any trusted role")


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def _rollback(version: int, floor: int) -> str:
    return f"version {version} is lower than trusted version {floor} (rollback?)"


def _check_common(signed: Signed, role: str, trusted: TrustedState | None, now: datetime) -> None:
    floor = trusted.versions.get(role, 0) if trusted else 0
    if signed.version < floor:
        raise VerificationError(role, _rollback(signed.version, floor))
    if signed.is_expired(now):
        raise VerificationError(role, f"expired at {signed.expires.isoformat()}")


def _root_cert_keys(
    root: Root, gun: str, now: datetime, check_expiry: bool, role: str
) -> dict[str, TufKey]:
    """Root keys rebuilt from certificates that pass notary's checks, by notary's key ID.

    notary's parseAllCerts, validRootLeafCerts and CertsToKeys: a key whose
    bundle fails is skipped; the signatures must then use the rebuilt key's ID.
    """
    keys: dict[str, TufKey] = {}
    reason = "no root key carries a certificate"
    for key in root.role_keys("root").values():
        if key.keytype not in ("ecdsa-x509", "rsa-x509"):
            continue  # notary only trusts root keys that carry a certificate
        try:
            rebuilt = root_certificate_key(key, gun, now=now, check_expiry=check_expiry)
        except VerificationError as e:
            reason = e.reason
            continue
        keys[rebuilt.key_id] = rebuilt
    if not keys:
        raise VerificationError(role, reason)
    return keys


def _reset_hint(gun: str) -> str:
    return (
        f"if its root really changed, re-trust it with 'signerctl trust pull {gun} --reset-trust'"
    )


def verify_root(
    gun: str,
    data: bytes,
    *,
    trusted_root: bytes | None = None,
    intermediates: Mapping[int, bytes] | None = None,
    now: datetime | None = None,
    role: str = "root",
) -> Root:
    """Verify root.json on its own and, if given, against the previously trusted root.

    Trust on first use holds at every version (notary's trustpinning.ValidateRoot):
    with a trusted root, the new root must be signed by a threshold of the
    trusted root's keys whatever its version, and a root whose content
    differs from the trusted one at the same or a lower version is refused.
    ``intermediates`` maps versions between the trusted and the new root to
    their files (``N.root.json``); each step must be signed by the previous
    root's keys. Raises VerificationError for ``role``'s file.
    """
    at = _now(now)
    env = Envelope.from_bytes(data, role)
    root = Root.from_dict(env.signed, role)
    if trusted_root is not None:
        # A damaged pinned root is named as the state file the CLI keeps it in.
        previous_env = Envelope.from_bytes(trusted_root, ".trusted")
        previous = Root.from_dict(previous_env.signed, ".trusted")
        for version, step in sorted((intermediates or {}).items()):
            if previous.version < version < root.version:
                name = f"{version}.root"
                step_root = _root_step(gun, step, previous, previous_env.signed, at, name)
                if step_root.version != version:
                    raise VerificationError(name, f"holds version {step_root.version}")
                previous = step_root
                previous_env = Envelope.from_bytes(step, name)
        _root_step(gun, data, previous, previous_env.signed, at, role)
    own = _root_cert_keys(root, gun, at, check_expiry=True, role=role)
    env.check_threshold(own, root.roles["root"].threshold, role)
    if root.is_expired(at):
        raise VerificationError(role, f"expired at {root.expires.isoformat()}")
    return root


def _root_step(
    gun: str, data: bytes, previous: Root, previous_signed: Mapping[str, Any], at: datetime,
    role: str,
) -> Root:
    env = Envelope.from_bytes(data, role)
    root = Root.from_dict(env.signed, role)
    if root.version < previous.version:
        raise VerificationError(role, _rollback(root.version, previous.version))
    if root.version == previous.version and env.signed != previous_signed:
        raise VerificationError(
            role,
            f"differs from the trusted root at the same version {root.version} "
            f"(could not rotate trust to a new trusted root; {_reset_hint(gun)})",
        )
    # Whatever the version, the keys trusted so far must approve this root;
    # their certificates may have expired since (notary does not check that here).
    try:
        old = _root_cert_keys(previous, gun, at, check_expiry=False, role=role)
    except VerificationError as e:
        raise VerificationError(role, f"previous root has no usable keys: {e.reason}") from None
    try:
        env.check_threshold(old, previous.roles["root"].threshold, role)
    except VerificationError:
        raise VerificationError(
            role,
            "not signed by the currently trusted root keys (rotation not approved: "
            f"could not rotate trust to a new trusted root; {_reset_hint(gun)})",
        ) from None
    return root


def verify_role(
    role: str,
    data: bytes,
    keys: Mapping[str, TufKey],
    threshold: int,
    *,
    trusted: TrustedState | None = None,
    now: datetime | None = None,
) -> Signed:
    """Verify one non-root file: parse, signatures by ``threshold`` of ``keys``, version, expiry.

    Hash checks against the referencing file are the caller's job.
    """
    env = Envelope.from_bytes(data, role)
    signed: Signed
    if role == "timestamp":
        signed = Timestamp.from_dict(env.signed, role)
    elif role == "snapshot":
        signed = Snapshot.from_dict(env.signed, role)
    else:
        signed = Targets.from_dict(env.signed, role)
    env.check_threshold(keys, threshold, role)
    _check_common(signed, role, trusted, _now(now))
    return signed


def _walk_allowed(target: str, chain: list[DelegatedRole]) -> bool:
    # A delegation may only sign paths allowed by itself and by every
    # delegation above it (notary's DelegationRole.Restrict).
    return all(d.allows(target) for d in chain)


def verify_repository(
    gun: str,
    files: Mapping[str, bytes],
    *,
    trusted: TrustedState | None = None,
    now: datetime | None = None,
) -> VerifiedRepository:
    """Verify a full set of metadata files and list the signed tags.

    ``files`` maps role names (``root``, ``timestamp``, ``snapshot``,
    ``targets``, ``targets/NAME``; optionally ``N.root`` for intermediate
    root versions) to file bytes. Raises VerificationError naming the first
    file that fails.
    """
    at = _now(now)
    for required in ("root", "timestamp", "snapshot", "targets"):
        if required not in files:
            raise VerificationError(required, "missing")

    intermediates = {
        int(name.split(".", 1)[0]): data
        for name, data in files.items()
        if name.endswith(".root") and name.split(".", 1)[0].isdigit()
    }
    root = verify_root(
        gun, files["root"], trusted_root=trusted.root if trusted else None,
        intermediates=intermediates, now=at,
    )
    floor = trusted.versions.get("root", 0) if trusted else 0
    if root.version < floor:
        raise VerificationError("root", _rollback(root.version, floor))
    versions: dict[str, int] = {"root": root.version}

    def _base(role: str) -> Signed:
        return verify_role(role, files[role], root.role_keys(role), root.roles[role].threshold,
                           trusted=trusted, now=at)

    timestamp = _base("timestamp")
    assert isinstance(timestamp, Timestamp)
    versions["timestamp"] = timestamp.version
    timestamp.meta["snapshot"].check(files["snapshot"], "snapshot")
    snapshot = _base("snapshot")
    assert isinstance(snapshot, Snapshot)
    versions["snapshot"] = snapshot.version
    snapshot.meta["root"].check(files["root"], "root")
    snapshot.meta["targets"].check(files["targets"], "targets")
    top = _base("targets")
    assert isinstance(top, Targets)
    versions["targets"] = top.version

    verified: dict[str, Targets] = {"targets": top}
    found: list[SignedTag] = [_tag(n, m, "targets") for n, m in top.targets.items()]
    # Walk the delegation tree (names are hierarchical, so there are no cycles).
    # Visiting order does not matter: every file must verify, and tags are sorted.
    stack: list[tuple[Targets, list[DelegatedRole]]] = [(top, [])]
    while stack:
        parent, chain = stack.pop()
        for entry in parent.delegations:
            name = entry.name
            if name not in files:
                if name in snapshot.meta:
                    raise VerificationError(name, "listed in snapshot.json but missing")
                continue  # delegated but never signed: no tags
            if name not in snapshot.meta:
                raise VerificationError(name, "not listed in snapshot.json")
            snapshot.meta[name].check(files[name], name)
            role = verify_role(name, files[name], parent.delegation_role_keys(name),
                               entry.threshold, trusted=trusted, now=at)
            assert isinstance(role, Targets)
            verified[name] = role
            versions[name] = role.version
            sub = [*chain, entry]
            found += [_tag(n, m, name) for n, m in role.targets.items() if _walk_allowed(n, sub)]
            stack.append((role, sub))

    def _order(t: SignedTag) -> tuple[str, int, str]:
        pref = TAG_ROLE_PREFERENCE.index(t.role) if t.role in TAG_ROLE_PREFERENCE else 99
        return (t.name, pref, t.role)

    return VerifiedRepository(
        gun=gun,
        tags=tuple(sorted(found, key=_order)),
        state=TrustedState(versions, files["root"]),
        root=root,
        targets=verified,
    )


def _tag(name: str, meta: FileMeta, role: str) -> SignedTag:
    digest = meta.hashes.get("sha256")
    if digest is None or len(digest) != 32:
        raise VerificationError(role, f"target {name!r} has no valid sha256 hash")
    return SignedTag(name, digest.hex(), meta.length, role)
