"""The Docker Content Trust workflows behind ``signerctl trust``, without argv or printing.

Each workflow takes plain values, a way to open a :class:`KeySource` and,
where it talks to a Notary server, a way to make a :class:`NotaryClient`,
and returns a frozen result. Both are *openers*, called only once the
workflow has checked what it can check locally (a missing trust directory is
reported before any daemon or token is reached, as before the split):

* ``keys``: ``() -> context manager yielding a KeySource``, e.g.
  ``lambda: contextlib.nullcontext(TokenKeys(service))``;
* ``notary``: ``(Settings | None) -> NotaryClient``; it is given the
  directory's recorded settings (server URL, CA file) to fall back on.

Which key signs a role: the first key that the metadata lists for the role
(for root, the canonical ID of the certificate's key) that the key source has
for the caller. Where snapshot and timestamp are signed: see
:func:`refresh`. Errors are :class:`signerd.errors.SignerdError` subclasses
with the message ``signerctl`` prints; messages that say what to run next name
``signerctl``'s commands and flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from signerd.errors import FailedPrecondition, InvalidArgument, NotFound, SignerdError
from signerd.keys import validate_gun, validate_role
from signerd.trust._edits import parent_role
from signerd.trust._key import TufKey, key_from_pem
from signerd.trust.errors import VerificationError
from signerd.trust.keysource import KeySource
from signerd.trust.metadata import Envelope, Root, check_writable
from signerd.trust.notary_http import MetadataNotFound, NotaryClient
from signerd.trust.repo import TrustRepo, signer_key
from signerd.trust.results import (
    DelegationAddResult,
    DelegationRemoveResult,
    InitResult,
    InspectResult,
    PublishResult,
    PullResult,
    Retrust,
    RotateResult,
    SignResult,
    UnsignResult,
)
from signerd.trust.signer import TrustSigner
from signerd.trust.state import (
    Settings,
    changes,
    load_settings,
    load_state,
    open_repo,
    save_settings,
    save_state,
)
from signerd.trust.verify import TrustedState, VerifiedRepository, verify_repository
from signerd.trust.x509 import x509_key_id

KeysOpener = Callable[[], AbstractContextManager[KeySource]]
NotaryOpener = Callable[[Settings | None], NotaryClient]


# --- helpers ------------------------------------------------------------------------


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; InvalidArgument naming ``what`` if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {what} {path}: {e.strerror}") from None


def delegation_role(role: str) -> str:
    """``role`` if it is a valid delegation name (``targets/NAME``); else InvalidArgument."""
    validate_role(role)
    if not role.startswith("targets/"):
        raise InvalidArgument(f"{role} is not a delegation role: use targets/NAME")
    return role


def role_keys(repo: TrustRepo, role: str) -> dict[str, TufKey]:
    """The keys the metadata lists for ``role``; NotFound for an unknown delegation."""
    if role in ("root", "targets", "snapshot", "timestamp"):
        return repo.root().role_keys(role)
    parent = repo.targets(parent_role(role)) if repo.read(parent_role(role)) is not None else None
    if parent is None or parent.delegation(role) is None:
        raise NotFound(f"{role} is not a delegation of {parent_role(role)} in {repo.gun}")
    return parent.delegation_role_keys(role)


def find_signer(keys: KeySource, repo: TrustRepo, role: str) -> TrustSigner | None:
    """A key of ``role`` that ``keys`` has for the caller, or None."""
    # canonical_id: root keys are listed as x509 keys, signerd knows the bare key.
    for key in role_keys(repo, role).values():
        signer = keys.find(key.canonical_id)
        if signer is not None:
            return signer
    return None


def signer_for(keys: KeySource, repo: TrustRepo, role: str) -> TrustSigner:
    """Like :func:`find_signer`, but NotFound (listing the role's keys) if there is none."""
    signer = find_signer(keys, repo, role)
    if signer is None:
        ids = ", ".join(k.canonical_id for k in role_keys(repo, role).values()) or "none"
        raise NotFound(
            f"signerd holds no key of {role} for {repo.gun} that you may use "
            f"(the role's keys: {ids})"
        )
    return signer


def refresh(repo: TrustRepo, keys: KeySource) -> str:
    """Re-sign snapshot and timestamp where this trust directory signs them.

    Where ``init`` recorded which roles it signs, that decides; in a pulled
    directory (unknown) notary's client rule applies: the snapshot is
    re-signed if the caller has its key, and otherwise left to the server.
    Returns "" or, when this directory signs the snapshot but the caller
    holds no snapshot key (a CI runner's tag), a line saying what to do:
    until then snapshot.json does not list the new file, and the repository
    does not verify.
    """
    local = load_settings(repo).local_roles
    if local is not None and "snapshot" not in local:
        return ""  # the Notary server makes the snapshot (and the timestamp)
    snapshot = find_signer(keys, repo, "snapshot")
    if snapshot is None:  # not the caller's key: left to the server, or to whoever holds it
        if local is None:
            return ""
        return (f"snapshot.json of {repo.gun} was not re-signed: you hold no snapshot key, so "
                "the repository does not verify until someone who does runs a signerctl "
                "trust command on it (e.g. trust sign, or trust publish)")
    repo.sign_snapshot(snapshot)
    if local is not None and "timestamp" in local:
        timestamp = find_signer(keys, repo, "timestamp")
        if timestamp is not None:
            repo.sign_timestamp(timestamp)
    return ""


def check_root_change(repo: TrustRepo) -> None:
    """Refuse a root change that clients could not follow (FailedPrecondition, saying
    what to do instead)."""
    # notary-server takes a new root only at the next version, and clients
    # follow rotations through every version (N.root): a second root change
    # before publishing would skip one.
    if "root" in repo.published() and "root" in repo.pending():
        raise FailedPrecondition(
            f"root.json of {repo.gun} already has an unpublished change: publish it with "
            f"'signerctl trust publish {repo.gun}' before changing root again (or discard it "
            f"with 'signerctl trust pull {repo.gun} --force')"
        )
    # Every new root (root or targets rotation) is signed by the current root's
    # keys; clients (and .trusted.json) accept it only if those are the keys they
    # trust. After one unverified root key rotation they are not, and no
    # intermediate root is kept here, so the next change would never verify.
    state = load_state(repo)
    if state is None or state.root is None:
        return  # nothing pinned yet: the first verification trusts what is there
    trusted = {k.canonical_id for k in _root_of(state.root).role_keys("root").values()}
    current = {k.canonical_id for k in repo.root().role_keys("root").values()}
    if trusted != current:
        raise FailedPrecondition(
            f"the root key of {repo.gun} was already rotated since it was last verified "
            f"({', '.join(sorted(trusted))} -> {', '.join(sorted(current))}): a second "
            f"root change would not chain. Run 'signerctl trust publish {repo.gun}' (or, without "
            f"a Notary server, 'signerctl trust inspect {repo.gun}') first, then rotate again"
        )


def _root_of(data: bytes) -> Root:
    return Root.from_dict(Envelope.from_bytes(data, "root").signed)


def default_role(repo: TrustRepo) -> str:
    """Where a tag is signed by default: ``targets/releases`` if delegated, else ``targets``."""
    return "targets/releases" if repo.targets().delegation("targets/releases") else "targets"


def _root_key_ids(root_json: bytes | None) -> list[str]:
    """The root role's key IDs as root.json lists them (empty if unreadable)."""
    if root_json is None:
        return []
    try:
        return sorted(Root.from_dict(Envelope.from_bytes(root_json, "root").signed).roles["root"]
                      .keyids)
    except (VerificationError, KeyError):
        return []


def _retrust(before: TrustedState | None, result: VerifiedRepository) -> Retrust:
    return Retrust(
        tuple(_root_key_ids(before.root if before else None)),
        tuple(sorted(result.root.roles["root"].keyids)),
    )


def pull_into(
    repo: TrustRepo, client: NotaryClient, *, reset_trust: bool = False
) -> tuple[VerifiedRepository, TrustedState | None]:
    """Fetch, verify against what this directory trusted before, store, remember.

    With ``reset_trust`` the pinned root is forgotten (trust on first use
    again); returns the state that was trusted before, for reporting.
    """
    state = load_state(repo, reset_trust=reset_trust)
    pinned = None if reset_trust else state
    # The pinned state verifies the root chain before the timestamp and snapshot
    # steer any download (NotaryClient.pull, TUF's client order).
    pulled = client.pull(repo.gun, trusted=pinned)
    result = verify_repository(repo.gun, pulled, trusted=pinned)
    repo.store_pulled(pulled)
    save_state(repo, result.state)
    return result, state


class NewKeys:
    """A key source that remembers the keys it made, so that a workflow that
    fails can destroy them again (see :func:`undone_on_failure`)."""

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self.made: list[str] = []

    def create(self, gun: str, role: str) -> TrustSigner:
        """As :meth:`KeySource.create`; the new key is remembered."""
        signer = self.source.create(gun, role)
        self.made.append(signer.key_id)
        return signer

    def get(self, key_id: str) -> TrustSigner:
        """As :meth:`KeySource.get`."""
        return self.source.get(key_id)

    def find(self, key_id: str) -> TrustSigner | None:
        """As :meth:`KeySource.find`."""
        return self.source.find(key_id)

    def delete(self, key_id: str) -> None:
        """As :meth:`KeySource.delete`."""
        self.source.delete(key_id)


@contextmanager
def undone_on_failure(source: KeySource) -> Iterator[NewKeys]:
    """Keys made inside the block are destroyed if it fails (issue 21 §4: a
    failed ``init`` left a root and a targets key on the tokens that nothing
    referred to). They have signed nothing that was kept: the block's file
    changes are undone too (:func:`changes`). A key that cannot be destroyed
    (the policy does not grant "delete", the daemon went away) is named in the
    error, with the command that destroys it; a Ctrl-C (KeyboardInterrupt)
    is raised on after the attempt, as it came."""
    keys = NewKeys(source)
    try:
        yield keys
    except BaseException as e:
        left = []
        for key_id in reversed(keys.made):
            try:
                keys.source.delete(key_id)
            except Exception:  # noqa: BLE001 - reported below, with the first failure
                left.append(key_id)
        if left and isinstance(e, SignerdError):
            raise KeysLeft(
                f"{e}; the new key(s) {', '.join(reversed(left))} could not be deleted: "
                "delete them with 'signerctl keys delete KEYID'") from e
        raise


class KeysLeft(SignerdError):
    """A workflow failed, and keys it made could not be destroyed; the message
    names them (the original error is the ``__cause__``)."""


def check_new_on_server(server: NotaryClient, gun: str) -> None:
    """FailedPrecondition if the Notary server already has ``gun`` (its root.json).

    ``init`` makes a new repository, whose root.json is version 1; the server
    takes a root only at its current version + 1 (notary's
    server/handlers/validation.go), so a publish could never succeed, and
    the keys made for it would be orphans (issue 21 §4)."""
    try:
        data = server.get(gun, "root")
    except MetadataNotFound:
        return
    try:
        version = f" (root version {int(Envelope.from_bytes(data, 'root').signed['version'])})"
    except (VerificationError, KeyError, TypeError, ValueError):
        version = ""
    raise FailedPrecondition(
        f"{gun} already exists on the Notary server {server.url}{version}; 'trust init' makes "
        f"a new repository only. To sign its tags, fetch it: 'signerctl trust pull {gun} "
        f"--server {server.url}'; nothing was created")


# --- workflows ----------------------------------------------------------------------


def init(
    base: Path,
    gun: str,
    keys: KeysOpener,
    notary: NotaryOpener | None = None,
    *,
    root_key: str | None = None,
    local_snapshot: bool = False,
) -> InitResult:
    """Create root, targets (and local snapshot/timestamp) keys and the first metadata.

    With ``notary``, the server is asked first: FailedPrecondition if it
    already has ``gun`` (:func:`check_new_on_server`); then its timestamp key
    (and snapshot key, unless ``local_snapshot``) is fetched, so that an
    unreachable or refusing server leaves no new keys behind; signerd makes
    the others. If anything fails after that, the keys made are destroyed
    again (:func:`undone_on_failure`). ``root_key`` reuses a root key signerd
    holds. InvalidArgument if ``gun`` is already initialised.
    """
    gun = validate_gun(gun)
    repo = TrustRepo(base, gun)
    if repo.read("root") is not None:
        raise InvalidArgument(f"{gun} is already initialised in {repo.path}")
    server = notary(None) if notary is not None else None
    if server is not None:
        check_new_on_server(server, gun)
    timestamp_key = server.get_key(gun, "timestamp") if server else None
    snapshot_key = server.get_key(gun, "snapshot") if server and not local_snapshot else None
    with keys() as opened, undone_on_failure(opened) as source:
        root = source.get(root_key) if root_key else source.create(gun, "root")
        targets = source.create(gun, "targets")
        local: list[str] = []
        snapshot = None
        if snapshot_key is None:
            snapshot = source.create(gun, "snapshot")
            local.append("snapshot")
        timestamp = None
        if timestamp_key is None:
            timestamp = source.create(gun, "timestamp")
            timestamp_key = signer_key(timestamp)
            local.append("timestamp")
        with changes(repo) as changed:
            repo.init(
                root,
                targets,
                timestamp_key=timestamp_key,
                snapshot_key=snapshot_key,
                snapshot_signer=snapshot,
            )
            if timestamp is not None:
                repo.sign_timestamp(timestamp)
            save_settings(
                repo,
                Settings(
                    server.url if server else None, tuple(local), server.ca_file if server else None
                ),
            )
    meta = repo.root()
    root_cert = meta.keys[meta.roles["root"].keyids[0]]
    return InitResult(
        gun=gun,
        path=repo.path,
        root_key_id=root.key_id,
        root_certificate_key_id=x509_key_id(root_cert.public),
        targets_key_id=targets.key_id,
        snapshot_key_id=meta.roles["snapshot"].keyids[0],
        timestamp_key_id=meta.roles["timestamp"].keyids[0],
        signed_locally=tuple(local),
        server=server.url if server else None,
        files=tuple(changed),
    )


def sign(
    base: Path,
    gun: str,
    tag: str,
    digest: bytes,
    size: int,
    keys: KeysOpener,
    *,
    role: str | None = None,
) -> SignResult:
    """Add or replace ``tag`` (raw SHA-256 ``digest``, ``size`` bytes) in a targets role.

    ``role`` defaults to :func:`default_role`; snapshot and timestamp are
    re-signed where this directory signs them (:func:`refresh`).
    """
    repo = open_repo(base, gun)
    with keys() as source, changes(repo) as changed:
        role = validate_role(role) if role else default_role(repo)
        signer = signer_for(source, repo, role)
        repo.add_target(tag, digest, size, signer, role=role)
        stale = refresh(repo, source)
    return SignResult(gun, tag, digest, size, role, signer.key_id, tuple(changed), stale)


def unsign(base: Path, gun: str, tag: str, keys: KeysOpener, *, role: str | None = None
           ) -> UnsignResult:
    """Remove ``tag`` from a targets role (default as for :func:`sign`)."""
    repo = open_repo(base, gun)
    with keys() as source, changes(repo) as changed:
        role = validate_role(role) if role else default_role(repo)
        signer = signer_for(source, repo, role)
        repo.remove_target(tag, signer, role=role)
        refresh(repo, source)
    return UnsignResult(gun, tag, role, signer.key_id, tuple(changed))


def add_delegation(
    base: Path,
    gun: str,
    role: str,
    keys: KeysOpener,
    *,
    key_ids: Sequence[str] = (),
    pubkey_files: Sequence[Path] = (),
    paths: Sequence[str] | None = None,
) -> DelegationAddResult:
    """Delegate ``role`` (targets/NAME) to keys signerd holds (``key_ids``) and to PEM
    public keys or certificates (``pubkey_files``), for tag prefixes ``paths``
    (default ``[""]``, every tag). The parent role's key signs."""
    gun = validate_gun(gun)
    role = delegation_role(role)
    repo = open_repo(base, gun)
    check_writable(list(paths or []), parent_role(role), "delegation path")
    pems = [key_from_pem(read_file(Path(p), "public key")) for p in pubkey_files]
    with keys() as source, changes(repo) as changed:
        added = [signer_key(source.get(k)) for k in key_ids] + pems
        parent = signer_for(source, repo, parent_role(role))
        repo.add_delegation(role, added, parent, paths=paths)
        refresh(repo, source)
    return DelegationAddResult(
        gun,
        role,
        tuple(k.key_id for k in added),
        tuple(paths) if paths is not None else ("",),
        tuple(changed),
    )


def remove_delegation(base: Path, gun: str, role: str, keys: KeysOpener) -> DelegationRemoveResult:
    """Remove delegation ``role`` (its tags become invisible); the parent role's key signs."""
    gun = validate_gun(gun)
    role = delegation_role(role)
    repo = open_repo(base, gun)
    with keys() as source, changes(repo) as changed:
        parent = signer_for(source, repo, parent_role(role))
        repo.remove_delegation(role, parent)
        refresh(repo, source)
    return DelegationRemoveResult(gun, role, tuple(changed))


def rotate(
    base: Path,
    gun: str,
    role: str,
    keys: KeysOpener,
    notary: NotaryOpener,
    *,
    key_id: str | None = None,
) -> RotateResult:
    """Replace the key of root, targets, a delegation, or the snapshot or timestamp.

    ``key_id`` names the new key (signerd must hold it); by default one is
    made. For root and targets the root key approves (and, for root, the old
    root key signs the new root too); for a delegation, its parent's key.
    Snapshot and timestamp: see :func:`_rotate_server_role`. ``notary`` is
    called only for those, when the server holds the role's key.
    """
    gun = validate_gun(gun)
    role = validate_role(role)
    repo = open_repo(base, gun)
    if role in ("snapshot", "timestamp"):
        return _rotate_server_role(repo, role, keys, notary, key_id)
    if role in ("root", "targets"):
        check_root_change(repo)
    with keys() as opened, undone_on_failure(opened) as source, changes(repo) as changed:
        old = {k.canonical_id for k in role_keys(repo, role).values()}
        # Found before a new key is made, so that a caller who cannot approve
        # the change leaves no orphan key behind.
        approver = signer_for(
            source, repo, "root" if role in ("root", "targets") else parent_role(role)
        )
        new = source.get(key_id) if key_id else source.create(gun, role)
        if new.key_id in old:
            raise InvalidArgument(f"key {new.key_id} already signs {role}")
        if role == "root":
            # The old root key signs too, so clients that trust it accept the new root.
            repo.rotate_root_key(approver, new)
        elif role == "targets":
            repo.rotate_targets_key(approver, new)
        else:
            repo.rotate_delegation_key(role, approver, new)
        refresh(repo, source)
    return RotateResult(gun, role, tuple(sorted(old)), new.key_id, tuple(changed))


def _rotate_server_role(
    repo: TrustRepo, role: str, keys: KeysOpener, notary: NotaryOpener, key_id: str | None
) -> RotateResult:
    """Rotate the snapshot or timestamp key.

    Where this directory signs the role (offline, or ``--local-snapshot``) the
    new key is made in signerd. Otherwise the Notary server makes it
    (``POST .../ROLE.key``); a new root.json signed by the root key lists it
    and is published at once, so the server signs with it from then on.
    """
    gun = repo.gun
    if key_id:
        raise InvalidArgument(f"--key does not apply to {role}: the new key is made for you")
    check_root_change(repo)
    settings = load_settings(repo)
    local = settings.local_roles is not None and role in settings.local_roles
    pending = sorted(repo.pending()) if not local and repo.published() else []
    if pending:
        raise FailedPrecondition(
            f"{gun} has unpublished changes ({', '.join(pending)}): publish them with "
            f"'signerctl trust publish {gun}' before rotating the {role} key"
        )
    client = None if local else notary(settings)
    old = sorted(repo.root().roles[role].keyids)
    published: list[str] = []
    with keys() as opened, undone_on_failure(opened) as source, changes(repo) as changed:
        root_signer = signer_for(source, repo, "root")  # before the server makes a key
        signer = source.create(gun, role) if local else None
        new_key = signer_key(signer) if signer is not None else None
        if client is not None:
            new_key = client.rotate_key(gun, role)
        assert new_key is not None
        if new_key.key_id in old:
            raise FailedPrecondition(f"the Notary server returned the current {role} key")
        if role == "snapshot":
            repo.rotate_snapshot_key(root_signer, new_key, snapshot_signer=signer)
        else:
            repo.rotate_timestamp_key(root_signer, new_key, timestamp_signer=signer)
        refresh(repo, source)
        if client is not None:
            files = repo.pending()
            client.publish(gun, files)  # a refusal rolls the local change back
            repo.mark_published(files)
            published = sorted(files)
    if client is not None:
        try:
            pull_into(repo, client)
        except SignerdError as e:
            raise FailedPrecondition(
                f"published {', '.join(published)}, but the server's trust data does not "
                f"verify: {e}"
            ) from None
    return RotateResult(gun, role, tuple(old), new_key.key_id, tuple(changed), tuple(published))


def publish(base: Path, gun: str, notary: NotaryOpener) -> PublishResult:
    """Upload changed metadata, then fetch back and verify what the server now serves.

    FailedPrecondition if the upload was taken but what the server then
    serves does not verify.
    """
    gun = validate_gun(gun)
    repo = open_repo(base, gun)
    client = notary(load_settings(repo))
    files = repo.pending()
    if not files:
        return PublishResult(gun, (), None)
    client.publish(gun, files)
    repo.mark_published(files)
    try:
        result, _ = pull_into(repo, client)
    except SignerdError as e:
        raise FailedPrecondition(
            f"published {', '.join(sorted(files))}, but the server's trust data "
            f"does not verify: {e}"
        ) from None
    return PublishResult(gun, tuple(sorted(files)), dict(result.state.versions))


def pull(
    base: Path, gun: str, notary: NotaryOpener, *, force: bool = False, reset_trust: bool = False
) -> PullResult:
    """Fetch and verify a repository's trust data into the trust directory.

    Refused (FailedPrecondition) over unpublished local changes unless
    ``force``. ``reset_trust`` forgets the pinned root and trusts the
    server's; the result then says which root keys were replaced.
    """
    gun = validate_gun(gun)
    repo = TrustRepo(base, gun)
    pending = [] if force else sorted(repo.pending())
    if pending:
        raise FailedPrecondition(
            f"{gun} has unpublished changes ({', '.join(pending)}): publish them, "
            "or pull --force to discard them"
        )
    settings = load_settings(repo)
    client = notary(settings)
    result, before = pull_into(repo, client, reset_trust=reset_trust)
    if settings.server is None:  # later publishes and pulls need no --server
        save_settings(repo, Settings(client.url, settings.local_roles, client.ca_file))
    return PullResult(gun, result, _retrust(before, result) if reset_trust else None)


def _signing_keys(result: VerifiedRepository, role: str) -> list[str]:
    """Canonical IDs of the keys trusted to sign a verified targets role."""
    if role == "targets":
        keys = result.root.role_keys(role)
    else:
        keys = result.targets[parent_role(role)].delegation_role_keys(role)
    return sorted(k.canonical_id for k in keys.values())


def inspect(base: Path, gun: str, tag: str | None = None, *, reset_trust: bool = False
            ) -> InspectResult:
    """Verify as a Content Trust client does; the signed tags (or only ``tag``).

    ``reset_trust`` forgets the pinned root and trusts the local one. A
    verification failure over unpublished local changes says so.
    """
    repo = open_repo(base, gun)
    files = repo.files()
    if "timestamp" not in files:
        raise NotFound(
            f"{gun} has no timestamp.json in {repo.path}: publish it (the Notary server "
            "signs the timestamp), or pull it"
        )
    before = load_state(repo, reset_trust=reset_trust)
    try:
        result = verify_repository(gun, files, trusted=None if reset_trust else before)
    except VerificationError as e:
        changed = sorted(repo.pending()) if repo.published() else []
        if not changed:
            raise
        # Usually a signed-but-unpublished change: the server re-signs the snapshot.
        raise VerificationError(
            e.role,
            f"{e.reason} (local files differ from the last "
            f"publish or pull: {', '.join(changed)}; publish them with 'signerctl trust "
            f"publish {gun}', or discard them with 'signerctl trust pull {gun} --force')",
        ) from None
    save_state(repo, result.state)
    tags = (result.tag(tag),) if tag is not None else tuple(result.tags)
    signers = {role: _signing_keys(result, role) for role in result.targets}
    return InspectResult(
        gun, tags, dict(result.state.versions), signers,
        _retrust(before, result) if reset_trust else None,
    )
