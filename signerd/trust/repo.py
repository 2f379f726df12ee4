"""A local trust directory for one GUN, and the operations that change it.

Layout mirrors what Notary serves: ``<base>/<gun>/root.json``,
``targets.json``, ``targets/NAME.json``, ``snapshot.json``,
``timestamp.json``. ``.published.json`` records the SHA-256 of each file as
last published or pulled, so that only changed files are uploaded (the
server refuses a version it already has).

Every operation takes :class:`TrustSigner` objects for exactly the keys it
needs: a CI runner signing ``targets/ci`` needs only that role's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from signerd.errors import InvalidArgument, NotFound
from signerd.keys import validate_gun, validate_role
from signerd.trust._key import TufKey
from signerd.trust.errors import DamagedState, NotAuthorized
from signerd.trust.metadata import (
    DelegatedRole,
    Envelope,
    FileMeta,
    RoleKeys,
    Root,
    Signed,
    Snapshot,
    Targets,
    Timestamp,
    check_writable,
    default_expires,
    parse_signed,
    sign_envelope,
)
from signerd.trust.signer import TrustSigner
from signerd.trust.x509 import build_root_certificate, certificate_key, check_root_certificate

_PUBLISHED = ".published.json"


def signer_key(signer: TrustSigner) -> TufKey:
    """The bare TUF key of a signer, as it goes into root.json or a delegation."""
    return TufKey(signer.keytype, signer.public)


def _metadata_id(keys: Mapping[str, TufKey], signer: TrustSigner, role: str) -> str:
    """The key ID ``keys`` uses for ``signer`` (the x509 ID for certificate keys)."""
    for kid, key in keys.items():
        if key.canonical_id == signer.key_id:
            return kid
    raise NotAuthorized(f"key {signer.key_id} is not a signing key of {role}")


def _parent(role: str) -> str:
    return role.rsplit("/", 1)[0]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TrustRepo:
    """Trust data for one GUN in a local directory."""

    def __init__(self, base: str | os.PathLike[str], gun: str) -> None:
        self.gun = validate_gun(gun)
        self.path = Path(base) / gun

    # --- files -------------------------------------------------------------

    def _file(self, role: str) -> Path:
        # Role names are validated, so no name can climb out of the directory.
        return self.path / f"{validate_role(role)}.json"

    def read(self, role: str) -> bytes | None:
        """The bytes of ``role``'s file, or None if there is none."""
        try:
            return self._file(role).read_bytes()
        except FileNotFoundError:
            return None

    def _envelope(self, role: str) -> Envelope:
        data = self.read(role)
        if data is None:
            raise NotFound(f"{self.gun} has no {role}.json in {self.path}")
        return Envelope.from_bytes(data, role)

    def root(self) -> Root:
        """The current root.json, parsed (not verified)."""
        return Root.from_dict(self._envelope("root").signed)

    def targets(self, role: str = "targets") -> Targets:
        """A targets or delegation file, parsed (not verified)."""
        return Targets.from_dict(self._envelope(role).signed, role)

    def roles(self) -> list[str]:
        """Names of every metadata file present, delegations included."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.rglob("*.json"):
            name = p.relative_to(self.path).as_posix()[: -len(".json")]
            try:
                found.append(validate_role(name))
            except InvalidArgument:
                continue  # not a metadata file (N.root.json, or a name Notary refuses)
        return sorted(found)

    def files(self) -> dict[str, bytes]:
        """Role name → file bytes for every metadata file present (for verification)."""
        out = {}
        for role in self.roles():
            data = self.read(role)
            if data is not None:
                out[role] = data
        return out

    def write(self, role: str, data: bytes) -> None:
        """Write a metadata file atomically (a reader never sees half a file)."""
        write_atomic(self._file(role), data)

    def _save(self, role: str, signed: Signed, signers: Mapping[str, TrustSigner]) -> None:
        body = signed.to_dict()
        check_writable(body, role, "metadata string")  # before any signature is made
        self.write(role, sign_envelope(body, signers).to_bytes())

    # --- publish bookkeeping -------------------------------------------------

    def _published(self) -> dict[str, str]:
        path = self.path / _PUBLISHED
        try:
            doc = json.loads(path.read_bytes())
            return {str(k): str(v) for k, v in doc.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, RecursionError) as e:
            raise DamagedState(
                f"{path} is damaged ({type(e).__name__}): fetch the server's trust data "
                f"again with 'signerctl trust pull {self.gun} --force'"
            ) from None

    def published(self) -> dict[str, str]:
        """Role → hex SHA-256 of each file as last published or pulled (empty if never)."""
        return self._published()

    def pending(self) -> dict[str, bytes]:
        """Files changed since the last publish or pull: what ``publish`` must upload.

        The timestamp is never uploaded: notary-server always makes its own.
        """
        seen = self._published()
        return {
            role: data
            for role, data in self.files().items()
            if role != "timestamp" and seen.get(role) != hashlib.sha256(data).hexdigest()
        }

    def mark_published(self, files: Mapping[str, bytes]) -> None:
        """Record ``files`` as what the server now has."""
        seen = self._published()
        seen.update({role: hashlib.sha256(data).hexdigest() for role, data in files.items()})
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / _PUBLISHED).write_text(json.dumps(seen, sort_keys=True, indent=1))

    def store_pulled(self, files: Mapping[str, bytes]) -> None:
        """Replace local metadata with ``files`` fetched from a server (verify them first).

        Intermediate roots (``N.root``) are only needed to verify, so they are not kept.
        """
        current = {role: data for role, data in files.items() if not role.endswith(".root")}
        for role in self.roles():
            if role not in current:
                self._file(role).unlink()
        for role, data in current.items():
            self.write(role, data)
        (self.path / _PUBLISHED).unlink(missing_ok=True)
        self.mark_published(current)

    # --- init ----------------------------------------------------------------

    def init(
        self,
        root_signer: TrustSigner,
        targets_signer: TrustSigner,
        *,
        timestamp_key: TufKey,
        snapshot_key: TufKey | None = None,
        snapshot_signer: TrustSigner | None = None,
        root_certificate: bytes | None = None,
        now: datetime | None = None,
    ) -> None:
        """Create root.json and targets.json (version 1), and snapshot.json if held locally.

        Give ``snapshot_key`` when the server manages the snapshot, or
        ``snapshot_signer`` to keep it local. ``root_certificate`` reuses an
        existing certificate for the root key; otherwise one is made.
        """
        if self.read("root") is not None:
            raise InvalidArgument(f"{self.gun} is already initialised in {self.path}")
        if snapshot_signer is not None and snapshot_key is None:
            snap = signer_key(snapshot_signer)
        elif snapshot_key is not None and snapshot_signer is None:
            snap = snapshot_key
        else:
            raise InvalidArgument(
                "give exactly one of snapshot_key (server) or snapshot_signer (local)"
            )
        at = now or datetime.now(UTC)
        cert = root_certificate or build_root_certificate(root_signer, self.gun, not_before=at)
        check_root_certificate(cert, self.gun, now=at)
        root_key = certificate_key(cert)
        if root_key.canonical_id != root_signer.key_id:
            raise InvalidArgument("root_certificate does not hold the root signer's key")
        role_keys = {
            "root": root_key,
            "targets": signer_key(targets_signer),
            "snapshot": snap,
            "timestamp": timestamp_key,
        }
        root = Root(
            version=1,
            expires=default_expires("root", at),
            keys={k.key_id: k for k in role_keys.values()},
            roles={name: RoleKeys([k.key_id]) for name, k in role_keys.items()},
        )
        self._save("root", root, {root_key.key_id: root_signer})
        targets = Targets(version=1, expires=default_expires("targets", at))
        self._save("targets", targets, {role_keys["targets"].key_id: targets_signer})
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

    # --- targets -------------------------------------------------------------

    def _role_keys(self, role: str) -> tuple[dict[str, TufKey], DelegatedRole | None]:
        if role == "targets":
            return self.root().role_keys("targets"), None
        validate_role(role)
        parent = self.targets(_parent(role))
        entry = parent.delegation(role)
        if entry is None:
            raise NotFound(f"{role} is not a delegation of {_parent(role)}; add it first")
        return parent.delegation_role_keys(role), entry

    def _load_or_new(self, role: str, at: datetime) -> Targets:
        if self.read(role) is None:
            return Targets(version=0, expires=default_expires(role, at))
        return self.targets(role)

    def _resign_targets(
        self, role: str, body: Targets, signer: TrustSigner, at: datetime,
        snapshot_signer: TrustSigner | None,
    ) -> None:
        keys, _ = self._role_keys(role)
        kid = _metadata_id(keys, signer, role)
        body.version += 1
        body.expires = default_expires(role, at)
        self._save(role, body, {kid: signer})
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

    def add_target(
        self,
        name: str,
        digest: bytes,
        length: int,
        signer: TrustSigner,
        *,
        role: str = "targets",
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Add or replace target ``name`` (a tag) in ``role`` and sign the role with ``signer``.

        ``digest`` is the raw SHA-256 of the manifest and ``length`` its size.
        """
        if not name:
            raise InvalidArgument("a target name is required")
        check_writable(name, role, "target name")
        if len(digest) != 32:
            raise InvalidArgument("digest must be 32 bytes of SHA-256")
        if length < 0:
            raise InvalidArgument(f"target size must not be negative, got {length}")
        at = now or datetime.now(UTC)
        keys, entry = self._role_keys(role)
        _metadata_id(keys, signer, role)  # refuse before touching anything
        if entry is not None and not entry.allows(name):
            raise NotAuthorized(f"{role} may not sign {name!r}: paths are {entry.paths}")
        body = self._load_or_new(role, at)
        body.targets[name] = FileMeta(length, {"sha256": digest})
        self._resign_targets(role, body, signer, at, snapshot_signer)

    def remove_target(
        self,
        name: str,
        signer: TrustSigner,
        *,
        role: str = "targets",
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Remove target ``name`` from ``role`` and re-sign it."""
        at = now or datetime.now(UTC)
        body = self._load_or_new(role, at)
        if name not in body.targets:
            raise NotFound(f"{name!r} is not signed in {role}")
        del body.targets[name]
        self._resign_targets(role, body, signer, at, snapshot_signer)

    # --- delegations ---------------------------------------------------------

    def add_delegation(
        self,
        role: str,
        keys: Sequence[TufKey],
        parent_signer: TrustSigner,
        *,
        paths: Sequence[str] | None = None,
        threshold: int = 1,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Add delegation ``role`` with ``keys`` (or add keys and paths to an existing one).

        ``paths`` defaults to ``[""]`` (every tag). The parent targets file is
        signed with ``parent_signer``.
        """
        validate_role(role)
        if not role.startswith("targets/"):
            raise InvalidArgument(f"{role} is not a delegation role (targets/NAME)")
        if threshold < 1:
            raise InvalidArgument("threshold must be at least 1")
        parent_name = _parent(role)
        check_writable(list(paths or []), parent_name, "delegation path")
        at = now or datetime.now(UTC)
        parent = self._load_or_new(parent_name, at)
        entry = parent.delegation(role)
        new_ids = [k.key_id for k in keys]
        if entry is None:
            if not keys:
                raise InvalidArgument(f"a new delegation {role} needs at least one key")
            entry = DelegatedRole(role, [], threshold, [])
            parent.delegations.append(entry)
        entry.keyids += [k for k in new_ids if k not in entry.keyids]
        entry.paths += [p for p in (paths if paths is not None else [""]) if p not in entry.paths]
        entry.threshold = threshold
        parent.delegation_keys.update({k.key_id: k for k in keys})
        self._resign_targets(parent_name, parent, parent_signer, at, snapshot_signer)

    def remove_delegation(
        self,
        role: str,
        parent_signer: TrustSigner,
        *,
        key_ids: Iterable[str] | None = None,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Remove delegation ``role``, or only the keys ``key_ids`` from it.

        Removing the whole role deletes its local file, so it leaves the snapshot.
        """
        parent_name = _parent(role)
        at = now or datetime.now(UTC)
        parent = self.targets(parent_name)
        entry = parent.delegation(role)
        if entry is None:
            raise NotFound(f"{role} is not a delegation of {parent_name}")
        if key_ids is None:
            parent.delegations.remove(entry)
        else:
            drop = set(key_ids)
            missing = drop - set(entry.keyids)
            if missing:
                raise NotFound(f"{role} has no key {sorted(missing)[0]}")
            entry.keyids = [k for k in entry.keyids if k not in drop]
        _prune_keys(parent)
        self._resign_targets(parent_name, parent, parent_signer, at, None)
        if key_ids is None:
            self._file(role).unlink(missing_ok=True)
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

    # --- rotation ------------------------------------------------------------

    def rotate_targets_key(
        self,
        root_signer: TrustSigner,
        new_targets_signer: TrustSigner,
        *,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Replace the targets key: root.json lists the new key, which re-signs targets.json."""
        at = now or datetime.now(UTC)
        root = self.root()
        self._set_role_key(root, "targets", signer_key(new_targets_signer))
        self._sign_root(root, [root_signer], at)
        self._resign_targets("targets", self.targets(), new_targets_signer, at, snapshot_signer)

    def rotate_snapshot_key(
        self,
        root_signer: TrustSigner,
        new_key: TufKey,
        *,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Replace the snapshot key (a server key, or a local one with ``snapshot_signer``)."""
        at = now or datetime.now(UTC)
        root = self.root()
        self._set_role_key(root, "snapshot", new_key)
        self._sign_root(root, [root_signer], at)
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)
        else:
            self._file("snapshot").unlink(missing_ok=True)

    def rotate_timestamp_key(
        self,
        root_signer: TrustSigner,
        new_key: TufKey,
        *,
        timestamp_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Replace the timestamp key (a server key, or a local one with ``timestamp_signer``).

        With a server key the local timestamp.json stays until the server's
        new one is pulled: it is never uploaded.
        """
        at = now or datetime.now(UTC)
        root = self.root()
        self._set_role_key(root, "timestamp", new_key)
        self._sign_root(root, [root_signer], at)
        if timestamp_signer is not None:
            self.sign_timestamp(timestamp_signer, now=at)

    def rotate_delegation_key(
        self,
        role: str,
        parent_signer: TrustSigner,
        new_key: TrustSigner | TufKey,
        *,
        old_key_id: str | None = None,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Replace ``old_key_id`` (default: every key) of delegation ``role`` with a new key.

        With a TrustSigner the delegation file is re-signed with the new key at
        once, so its tags stay valid. With a bare TufKey the file is left as
        it is, and its tags are invisible until the new key signs the role.
        """
        at = now or datetime.now(UTC)
        parent_name = _parent(role)
        parent = self.targets(parent_name)
        entry = parent.delegation(role)
        if entry is None:
            raise NotFound(f"{role} is not a delegation of {parent_name}")
        if old_key_id is not None and old_key_id not in entry.keyids:
            raise NotFound(f"{role} has no key {old_key_id}")
        key = new_key if isinstance(new_key, TufKey) else signer_key(new_key)
        kept = [] if old_key_id is None else [k for k in entry.keyids if k != old_key_id]
        entry.keyids = [*kept, key.key_id]
        parent.delegation_keys[key.key_id] = key
        _prune_keys(parent)
        self._resign_targets(parent_name, parent, parent_signer, at, None)
        if not isinstance(new_key, TufKey) and self.read(role) is not None:
            self._resign_targets(role, self.targets(role), new_key, at, None)
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

    def rotate_root_key(
        self,
        old_root_signer: TrustSigner,
        new_root_signer: TrustSigner,
        *,
        new_certificate: bytes | None = None,
        snapshot_signer: TrustSigner | None = None,
        now: datetime | None = None,
    ) -> None:
        """Replace the root key; the new root.json is signed by the old and the new key.

        Clients that trust the old root accept the new one because the old
        key signed it; afterwards only the new key counts.
        """
        at = now or datetime.now(UTC)
        cert = new_certificate or build_root_certificate(new_root_signer, self.gun, not_before=at)
        check_root_certificate(cert, self.gun, now=at)
        key = certificate_key(cert)
        if key.canonical_id != new_root_signer.key_id:
            raise InvalidArgument("new_certificate does not hold the new root signer's key")
        root = self.root()
        old_keys = root.role_keys("root")
        old_id = _metadata_id(old_keys, old_root_signer, "root")
        self._set_role_key(root, "root", key)
        self._sign_root(root, [new_root_signer], at, extra={old_id: old_root_signer})
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

    def _set_role_key(self, root: Root, role: str, key: TufKey) -> None:
        root.keys[key.key_id] = key
        root.roles[role] = RoleKeys([key.key_id], 1)
        used = {kid for r in root.roles.values() for kid in r.keyids}
        root.keys = {kid: k for kid, k in root.keys.items() if kid in used}

    def _sign_root(
        self, root: Root, signers: Sequence[TrustSigner], at: datetime,
        extra: Mapping[str, TrustSigner] | None = None,
    ) -> None:
        keys = root.role_keys("root")
        by_id = {_metadata_id(keys, s, "root"): s for s in signers}
        by_id.update(extra or {})
        root.version += 1
        root.expires = default_expires("root", at)
        self._save("root", root, by_id)

    # --- snapshot and timestamp ----------------------------------------------

    def _version(self, role: str) -> int:
        data = self.read(role)
        if data is None:
            return 0
        parsed = parse_signed(role, Envelope.from_bytes(data, role).signed)
        return parsed.version

    def sign_snapshot(self, signer: TrustSigner, *, now: datetime | None = None) -> None:
        """(Re)build snapshot.json over root, targets and every delegation file, and sign it."""
        at = now or datetime.now(UTC)
        keys = self.root().role_keys("snapshot")
        kid = _metadata_id(keys, signer, "snapshot")
        version = self._version("snapshot")
        meta = {
            role: FileMeta.for_bytes(data)
            for role, data in self.files().items()
            if role not in ("snapshot", "timestamp")
        }
        body = Snapshot(version=version + 1, expires=default_expires("snapshot", at), meta=meta)
        self._save("snapshot", body, {kid: signer})

    def sign_timestamp(self, signer: TrustSigner, *, now: datetime | None = None) -> None:
        """Sign timestamp.json over the current snapshot (normally the server's job)."""
        at = now or datetime.now(UTC)
        keys = self.root().role_keys("timestamp")
        kid = _metadata_id(keys, signer, "timestamp")
        snapshot = self.read("snapshot")
        if snapshot is None:
            raise NotFound(f"{self.gun} has no snapshot.json to timestamp")
        version = self._version("timestamp")
        body = Timestamp(
            version=version + 1,
            expires=default_expires("timestamp", at),
            meta={"snapshot": FileMeta.for_bytes(snapshot)},
        )
        self._save("timestamp", body, {kid: signer})


def _prune_keys(targets: Targets) -> None:
    # Keys no delegation uses any more leave the file, as notary does.
    used = {kid for d in targets.delegations for kid in d.keyids}
    targets.delegation_keys = {k: v for k, v in targets.delegation_keys.items() if k in used}
