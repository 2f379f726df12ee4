"""The operations that change a trust directory's metadata: init, targets,
delegations, snapshot and timestamp (key rotations are in :mod:`signerd.trust.repo`).

Every operation takes :class:`TrustSigner` objects for exactly the keys it
needs: a CI runner signing ``targets/ci`` needs only that role's key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from signerd.errors import InvalidArgument, NotFound
from signerd.keys import validate_role
from signerd.trust._files import TrustFiles
from signerd.trust._key import TufKey
from signerd.trust.errors import NotAuthorized
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


def signer_key(signer: TrustSigner) -> TufKey:
    """The bare TUF key of a signer, as it goes into root.json or a delegation."""
    return TufKey(signer.keytype, signer.public)


def metadata_id(keys: Mapping[str, TufKey], signer: TrustSigner, role: str) -> str:
    """The key ID ``keys`` uses for ``signer`` (the x509 ID for certificate keys).

    Raises NotAuthorized if ``signer`` is not one of ``keys``.
    """
    for kid, key in keys.items():
        if key.canonical_id == signer.key_id:
            return kid
    raise NotAuthorized(f"key {signer.key_id} is not a signing key of {role}")


def parent_role(role: str) -> str:
    """The role that delegates ``role``: ``targets/a/b`` → ``targets/a``."""
    return role.rsplit("/", 1)[0]


def prune_keys(targets: Targets) -> None:
    """Drop the delegation keys no delegation uses any more, as notary does."""
    used = {kid for d in targets.delegations for kid in d.keyids}
    targets.delegation_keys = {k: v for k, v in targets.delegation_keys.items() if k in used}


class TrustEdits(TrustFiles):
    """Signed changes to the metadata of one GUN (see :class:`signerd.trust.repo.TrustRepo`)."""

    def _save(self, role: str, signed: Signed, signers: Mapping[str, TrustSigner]) -> None:
        body = signed.to_dict()
        check_writable(body, role, "metadata string")  # before any signature is made
        self.write(role, sign_envelope(body, signers).to_bytes())

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
        parent = self.targets(parent_role(role))
        entry = parent.delegation(role)
        if entry is None:
            raise NotFound(f"{role} is not a delegation of {parent_role(role)}; add it first")
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
        kid = metadata_id(keys, signer, role)
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
        metadata_id(keys, signer, role)  # refuse before touching anything
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
        parent_name = parent_role(role)
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
        parent_name = parent_role(role)
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
        prune_keys(parent)
        self._resign_targets(parent_name, parent, parent_signer, at, None)
        if key_ids is None:
            self._file(role).unlink(missing_ok=True)
        if snapshot_signer is not None:
            self.sign_snapshot(snapshot_signer, now=at)

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
        kid = metadata_id(keys, signer, "snapshot")
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
        kid = metadata_id(keys, signer, "timestamp")
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

