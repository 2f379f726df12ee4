"""A local trust directory for one GUN, and the operations that change it.

Layout mirrors what Notary serves: ``<base>/<gun>/root.json``,
``targets.json``, ``targets/NAME.json``, ``snapshot.json``,
``timestamp.json``. ``.published.json`` records the SHA-256 of each file as
last published or pulled, so that only changed files are uploaded (the
server refuses a version it already has).

Every operation takes :class:`TrustSigner` objects for exactly the keys it
needs: a CI runner signing ``targets/ci`` needs only that role's key.

:class:`TrustRepo` is built in three layers, one module each:
:class:`~signerd.trust._files.TrustFiles` (the files and the publish
bookkeeping, no signing), :class:`~signerd.trust._edits.TrustEdits` (init,
targets, delegations, snapshot and timestamp) and, here, key rotation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from signerd.errors import InvalidArgument, NotFound
from signerd.keys import validate_gun, validate_role
from signerd.trust._edits import TrustEdits, metadata_id, parent_role, prune_keys, signer_key
from signerd.trust._files import write_atomic
from signerd.trust._key import TufKey
from signerd.trust.metadata import RoleKeys, Root, default_expires
from signerd.trust.signer import TrustSigner
from signerd.trust.x509 import build_root_certificate, certificate_key, check_root_certificate

# validate_gun and validate_role are re-exported: they are the one validator
# that the daemon, the CLI and the trust library share (tests check it).
__all__ = ["TrustRepo", "signer_key", "validate_gun", "validate_role", "write_atomic"]


class TrustRepo(TrustEdits):
    """Trust data for one GUN in a local directory."""

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
        parent_name = parent_role(role)
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
        prune_keys(parent)
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
        old_id = metadata_id(old_keys, old_root_signer, "root")
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
        by_id = {metadata_id(keys, s, "root"): s for s in signers}
        by_id.update(extra or {})
        root.version += 1
        root.expires = default_expires("root", at)
        self._save("root", root, by_id)
