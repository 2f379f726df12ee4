"""``signerctl trust``: Docker Content Trust with keys that never leave signerd's tokens.

Commands (each also takes ``--json``, ``--trust-dir DIR`` and ``--local``)::

    trust init GUN [--root-key KEYID] [--local-snapshot] [--server URL ...]
    trust sign GUN:TAG --digest sha256:HEX --size N [--role ROLE]
    trust unsign GUN:TAG [--role ROLE]
    trust delegation add GUN targets/NAME (--key KEYID | --pubkey FILE)... [--paths P...]
    trust delegation remove GUN targets/NAME
    trust rotate GUN ROLE [--key KEYID] [--server URL ...]
                          (ROLE: root, targets, targets/NAME, snapshot, timestamp)
    trust publish GUN [--server URL ...]
    trust pull GUN [--server URL ...] [--force] [--reset-trust]
    trust inspect GUN[:TAG] [--reset-trust]

Where the keys are. Every signature is made by signerd: through the daemon
(the client's mTLS identity and signerd's policy decide which keys it may
use), or with ``--local`` straight on the tokens of a signerd config, for
offline root ceremonies. The key for a role is found by matching the key IDs
that the metadata lists for the role (for root, the canonical ID of the
certificate's key) against the keys signerd lets the caller read. So a CI
runner whose policy covers only ``targets/releases`` can sign only that role,
and never needs the targets or root key.

Which role ``sign`` and ``unsign`` use without ``--role``: ``targets/releases``
if targets.json delegates it (what ``docker pull`` reads, and what ``docker
trust sign`` writes), else ``targets``.

Snapshot and timestamp. ``init --server`` takes the timestamp key, and the
snapshot key unless ``--local-snapshot``, from the Notary server, which then
signs those roles itself on every publish. ``rotate GUN timestamp|snapshot``
asks the server for a new key (``POST .../ROLE.key``), lists it in a new
root.json signed by the root key and publishes at once; where this directory
signs the role itself, the new key is made in signerd instead. Without a server (offline use and
tests) signerd holds all four keys, and each change re-signs snapshot and
timestamp. A trust directory remembers this in ``.signerctl.json``; one that
was pulled instead follows notary's client: it re-signs the snapshot if signerd
holds its key for the caller, and otherwise leaves it to the server.

``.trusted.json`` keeps what the last successful verification trusted (root
and versions), so that ``inspect`` and ``pull`` refuse rollbacks, and a root
that the trusted root's keys did not sign, whatever its version. A root that
really changed is re-trusted with ``pull --reset-trust`` (or ``inspect
--reset-trust`` offline), which prints the old and the new root key IDs.
A root change that clients could not follow (a second root key rotation
before the first was published or verified) is refused with what to do.

Notary credentials are never taken from argv: ``--password-file`` or
``$SIGNERD_NOTARY_PASSWORD`` (with ``--username`` or
``$SIGNERD_NOTARY_USERNAME``), or ``--token-file`` or ``$SIGNERD_NOTARY_TOKEN``.
Behind a registry's token auth, the basic credentials fetch the token.
``--server`` inside ``trust`` commands names the Notary server (as in notary's
own CLI); give signerd's address before ``trust``, in the client config, or
with ``--signerd``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signerd import embedded
from signerd.cli._util import add_client_options, connect, emit, whole_number
from signerd.config import load_config
from signerd.errors import FailedPrecondition, InvalidArgument, NotFound, SignerdError, quoted
from signerd.keys import validate_gun, validate_role, validate_tag
from signerd.service import KeyService
from signerd.trust import (
    Envelope,
    NotaryClient,
    Root,
    TrustedState,
    TrustRepo,
    TrustSigner,
    TufKey,
    VerificationError,
    VerifiedRepository,
    key_from_pem,
    signer_key,
    verify_repository,
    x509_key_id,
)
from signerd.trust.errors import DamagedState
from signerd.trust.keysource import DaemonKeys, KeySource, TokenKeys

# Re-exported at its old home, where tests/test_trust_e2e.py and callers import it.
from signerd.trust.keysource import RemoteSigner as RemoteSigner
from signerd.trust.metadata import check_writable
from signerd.trust.repo import write_atomic

SETTINGS_FILE = ".signerctl.json"
STATE_FILE = ".trusted.json"
_DIGEST_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
MAX_SIZE = (1 << 63) - 1  # bytes: a target's length is an int64 to Notary (Go)


# --- key sources -------------------------------------------------------------------


@contextmanager
def _key_source(args: argparse.Namespace) -> Iterator[KeySource]:
    if not args.local:
        with connect(args) as client:
            yield DaemonKeys(client)
        return
    path = args.daemon_config or embedded.state_dir() / "signerd.toml"
    config = load_config(path)
    os.environ.update(config.environment)  # e.g. SOFTHSM2_CONF, before the module loads
    service = KeyService.open(config)
    try:
        yield TokenKeys(service)
    finally:
        service.close()


# --- the trust directory ----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What ``init`` recorded about a repository (absent in a pulled trust dir).

    ``server`` and ``ca`` are the Notary server's URL and CA file, so that
    later commands need no ``--server``. ``local_roles`` lists which of
    snapshot and timestamp this directory signs; None means unknown, and then
    notary's client rule applies to the snapshot.
    """

    server: str | None = None
    local_roles: tuple[str, ...] | None = None
    ca: str | None = None


def trust_dir(args: argparse.Namespace) -> Path:
    """``--trust-dir``, ``$SIGNERD_TRUST_DIR``, or ``$XDG_DATA_HOME/signerd/trust``."""
    if args.trust_dir is not None:
        return Path(args.trust_dir)
    if os.environ.get("SIGNERD_TRUST_DIR"):
        return Path(os.environ["SIGNERD_TRUST_DIR"])
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "signerd" / "trust"


def _load_settings(repo: TrustRepo) -> Settings:
    try:
        doc = json.loads((repo.path / SETTINGS_FILE).read_bytes())
        local = doc.get("local_roles")
        return Settings(
            doc.get("server"), tuple(local) if local is not None else None, doc.get("ca")
        )
    except FileNotFoundError:
        return Settings()
    except (ValueError, AttributeError, TypeError) as e:
        raise DamagedState(
            f"{repo.path / SETTINGS_FILE} is damaged ({e}): remove it and give --server "
            "(and --ca) again"
        ) from None


def _save_settings(repo: TrustRepo, settings: Settings) -> None:
    local = list(settings.local_roles) if settings.local_roles is not None else None
    doc = {"server": settings.server, "local_roles": local, "ca": settings.ca}
    write_atomic(repo.path / SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())


def _load_state(repo: TrustRepo, *, reset_trust: bool = False) -> TrustedState | None:
    try:
        return TrustedState.from_json((repo.path / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return None  # first use: trust on first use, as a notary client does
    except InvalidArgument as e:
        if reset_trust:
            return None  # being replaced anyway
        raise DamagedState(
            f"{repo.path / STATE_FILE} is damaged ({e}): re-trust the repository with "
            f"'signerctl trust pull {repo.gun} --reset-trust' (or, without a Notary server, "
            f"'signerctl trust inspect {repo.gun} --reset-trust')"
        ) from None


def _save_state(repo: TrustRepo, state: TrustedState) -> None:
    write_atomic(repo.path / STATE_FILE, state.to_json())


def _open_repo(args: argparse.Namespace, gun: str) -> TrustRepo:
    repo = TrustRepo(trust_dir(args), gun)
    if repo.read("root") is None:
        raise NotFound(
            f"no trust data for {gun} in {trust_dir(args)}: "
            "run 'signerctl trust init' or 'signerctl trust pull' first"
        )
    return repo


@contextmanager
def _changes(repo: TrustRepo) -> Iterator[list[str]]:
    """Undo every file change if the block fails; afterwards, list the files it changed.

    A command signs several files in turn (a role, then snapshot and
    timestamp); a refusal half-way must not leave a mix of old and new.
    """
    before = repo.files()
    changed: list[str] = []
    try:
        yield changed
    except BaseException:
        for role in repo.roles():
            if role not in before:
                (repo.path / f"{role}.json").unlink(missing_ok=True)
        for role, data in before.items():
            repo.write(role, data)
        raise
    after = repo.files()
    changed += sorted(r for r in before.keys() | after.keys() if before.get(r) != after.get(r))


# --- metadata helpers ---------------------------------------------------------------


def _parent(role: str) -> str:
    return role.rsplit("/", 1)[0]


def _role_keys(repo: TrustRepo, role: str) -> dict[str, TufKey]:
    if role in ("root", "targets", "snapshot", "timestamp"):
        return repo.root().role_keys(role)
    parent = repo.targets(_parent(role)) if repo.read(_parent(role)) is not None else None
    if parent is None or parent.delegation(role) is None:
        raise NotFound(f"{role} is not a delegation of {_parent(role)} in {repo.gun}")
    return parent.delegation_role_keys(role)


def _find_signer(keys: KeySource, repo: TrustRepo, role: str) -> TrustSigner | None:
    # canonical_id: root keys are listed as x509 keys, signerd knows the bare key.
    for key in _role_keys(repo, role).values():
        signer = keys.find(key.canonical_id)
        if signer is not None:
            return signer
    return None


def _signer_for(keys: KeySource, repo: TrustRepo, role: str) -> TrustSigner:
    signer = _find_signer(keys, repo, role)
    if signer is None:
        ids = ", ".join(k.canonical_id for k in _role_keys(repo, role).values()) or "none"
        raise NotFound(
            f"signerd holds no key of {role} for {repo.gun} that you may use "
            f"(the role's keys: {ids})"
        )
    return signer


def _refresh(repo: TrustRepo, keys: KeySource) -> None:
    """Re-sign snapshot and timestamp where this trust directory signs them."""
    local = _load_settings(repo).local_roles
    if local is not None and "snapshot" not in local:
        return  # the Notary server makes the snapshot (and the timestamp)
    snapshot = _find_signer(keys, repo, "snapshot")
    if snapshot is None:
        return  # not the caller's key: left to the server, or to whoever holds it
    repo.sign_snapshot(snapshot)
    if local is not None and "timestamp" in local:
        timestamp = _find_signer(keys, repo, "timestamp")
        if timestamp is not None:
            repo.sign_timestamp(timestamp)


def _check_root_change(repo: TrustRepo) -> None:
    """Refuse a root change that clients could not follow; say what to do instead."""
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
    state = _load_state(repo)
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


def _default_role(repo: TrustRepo) -> str:
    return "targets/releases" if repo.targets().delegation("targets/releases") else "targets"


def split_reference(ref: str, *, tag_required: bool) -> tuple[str, str | None]:
    """``GUN[:TAG]`` → (gun, tag); a registry port (``host:5000/app``) is not a tag."""
    head, sep, tail = ref.rpartition(":")
    if sep and head and "/" not in tail:
        gun, tag = head, validate_tag(tail)
    else:
        gun, tag = ref, None
    validate_gun(gun)
    if tag_required and tag is None:
        raise InvalidArgument(f"{ref!r} names no tag: use GUN:TAG, e.g. docker.io/acme/app:v1")
    return gun, tag


def _digest(text: str) -> bytes:
    m = _DIGEST_RE.fullmatch(text.strip().lower())
    if m is None:
        raise InvalidArgument(f"--digest must be sha256:<64 hex digits>, not {quoted(text)}")
    return bytes.fromhex(m[1])


def _delegation_role(role: str) -> str:
    validate_role(role)
    if not role.startswith("targets/"):
        raise InvalidArgument(f"{role} is not a delegation role: use targets/NAME")
    return role


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {what} {path}: {e.strerror}") from None


# --- the Notary server ----------------------------------------------------------------


def _secret(path: Path | None, env: str, what: str) -> str | None:
    if path is not None:
        return _read_file(path, what).decode().rstrip("\r\n")
    return os.environ.get(env) or None


def _notary(args: argparse.Namespace, settings: Settings | None) -> NotaryClient:
    url = args.notary_url or (settings.server if settings else None)
    url = url or os.environ.get("SIGNERD_NOTARY_SERVER")
    if not url:
        raise InvalidArgument("no Notary server: pass --server https://notary.example.com")
    token = _secret(args.token_file, "SIGNERD_NOTARY_TOKEN", "token file")
    password = _secret(args.password_file, "SIGNERD_NOTARY_PASSWORD", "password file")
    username = args.username or os.environ.get("SIGNERD_NOTARY_USERNAME") or None
    if username is not None and password is None:
        raise InvalidArgument(
            "--username needs --password-file or $SIGNERD_NOTARY_PASSWORD "
            "(a password never goes on the command line)"
        )
    ca: str | None
    if args.ca is not None:
        _read_file(args.ca, "CA file")  # say so now, not as a TLS failure later
        ca = str(args.ca.resolve())
    else:  # the recorded CA belongs to the recorded server only
        ca = settings.ca if settings is not None and url == settings.server else None
    return NotaryClient(url, ca_file=ca, username=username, password=password, token=token)


def _root_key_ids(root_json: bytes | None) -> list[str]:
    """The root role's key IDs as root.json lists them (empty if unreadable)."""
    if root_json is None:
        return []
    try:
        return sorted(Root.from_dict(Envelope.from_bytes(root_json, "root").signed).roles["root"]
                      .keyids)
    except (VerificationError, KeyError):
        return []


def _pull_into(
    repo: TrustRepo, client: NotaryClient, *, reset_trust: bool = False
) -> tuple[VerifiedRepository, TrustedState | None]:
    """Fetch, verify against what this directory trusted before, store, remember.

    With ``reset_trust`` the pinned root is forgotten (trust on first use
    again); returns the state that was trusted before, for reporting.
    """
    state = _load_state(repo, reset_trust=reset_trust)
    pinned = None if reset_trust else state
    pulled = client.pull(
        repo.gun, trusted_root_version=pinned.versions.get("root") if pinned else None
    )
    result = verify_repository(repo.gun, pulled, trusted=pinned)
    repo.store_pulled(pulled)
    _save_state(repo, result.state)
    return result, state


# --- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    """Create root, targets (and local snapshot/timestamp) keys and the first metadata."""
    gun = validate_gun(args.gun)
    repo = TrustRepo(trust_dir(args), gun)
    if repo.read("root") is not None:
        raise InvalidArgument(f"{gun} is already initialised in {repo.path}")
    # Ask the server first: an unreachable server must not leave new keys behind.
    server = _notary(args, None) if args.notary_url else None
    timestamp_key = server.get_key(gun, "timestamp") if server else None
    snapshot_key = server.get_key(gun, "snapshot") if server and not args.local_snapshot else None
    with _key_source(args) as keys:
        root = keys.get(args.root_key) if args.root_key else keys.create(gun, "root")
        targets = keys.create(gun, "targets")
        local: list[str] = []
        snapshot = None
        if snapshot_key is None:
            snapshot = keys.create(gun, "snapshot")
            local.append("snapshot")
        timestamp = None
        if timestamp_key is None:
            timestamp = keys.create(gun, "timestamp")
            timestamp_key = signer_key(timestamp)
            local.append("timestamp")
        with _changes(repo) as changed:
            repo.init(
                root,
                targets,
                timestamp_key=timestamp_key,
                snapshot_key=snapshot_key,
                snapshot_signer=snapshot,
            )
            if timestamp is not None:
                repo.sign_timestamp(timestamp)
            _save_settings(
                repo,
                Settings(
                    server.url if server else None, tuple(local), server.ca_file if server else None
                ),
            )
    meta = repo.root()
    root_cert = meta.keys[meta.roles["root"].keyids[0]]
    data = {
        "gun": gun,
        "trust_dir": str(repo.path),
        "root_key_id": root.key_id,
        "root_certificate_key_id": x509_key_id(root_cert.public),
        "targets_key_id": targets.key_id,
        "snapshot_key_id": meta.roles["snapshot"].keyids[0],
        "timestamp_key_id": meta.roles["timestamp"].keyids[0],
        "signed_locally": local,
        "server": server.url if server else None,
        "files": changed,
    }
    where = ", ".join(local) if local else "none"
    emit(
        args,
        data,
        lambda: "\n".join(
            [
                f"initialised {gun} in {repo.path}",
                f"root key:    {root.key_id} (certificate key {data['root_certificate_key_id']})",
                f"targets key: {targets.key_id}",
                f"snapshot and timestamp signed here: {where}",
                f"wrote: {', '.join(changed)}",
            ]
        ),
    )


def cmd_sign(args: argparse.Namespace) -> None:
    """Add or replace a tag in a targets role, signed through signerd."""
    gun, tag = split_reference(args.ref, tag_required=True)
    assert tag is not None
    digest = _digest(args.digest)
    repo = _open_repo(args, gun)
    with _key_source(args) as keys, _changes(repo) as changed:
        role = validate_role(args.role) if args.role else _default_role(repo)
        signer = _signer_for(keys, repo, role)
        repo.add_target(tag, digest, args.size, signer, role=role)
        _refresh(repo, keys)
    data = {
        "gun": gun,
        "tag": tag,
        "digest": digest.hex(),
        "size": args.size,
        "role": role,
        "key_id": signer.key_id,
        "files": changed,
    }
    emit(
        args,
        data,
        lambda: (
            f"signed {gun}:{tag} (sha256:{digest.hex()}, {args.size} bytes) "
            f"in {role} with key {signer.key_id}"
        ),
    )


def cmd_unsign(args: argparse.Namespace) -> None:
    """Remove a tag from a targets role."""
    gun, tag = split_reference(args.ref, tag_required=True)
    assert tag is not None
    repo = _open_repo(args, gun)
    with _key_source(args) as keys, _changes(repo) as changed:
        role = validate_role(args.role) if args.role else _default_role(repo)
        signer = _signer_for(keys, repo, role)
        repo.remove_target(tag, signer, role=role)
        _refresh(repo, keys)
    data = {"gun": gun, "tag": tag, "role": role, "key_id": signer.key_id, "files": changed}
    emit(args, data, lambda: f"removed {gun}:{tag} from {role}")


def cmd_delegation_add(args: argparse.Namespace) -> None:
    """Delegate targets/NAME to keys held by signerd (--key) or given as PEM (--pubkey)."""
    gun = validate_gun(args.gun)
    role = _delegation_role(args.role)
    if not args.key and not args.pubkey:
        raise InvalidArgument("give the delegation's key: --key KEYID or --pubkey FILE")
    repo = _open_repo(args, gun)
    check_writable(list(args.paths or []), _parent(role), "delegation path")
    pems = [key_from_pem(_read_file(Path(p), "public key")) for p in args.pubkey]
    with _key_source(args) as keys, _changes(repo) as changed:
        added = [signer_key(keys.get(k)) for k in args.key] + pems
        parent = _signer_for(keys, repo, _parent(role))
        repo.add_delegation(role, added, parent, paths=args.paths)
        _refresh(repo, keys)
    data = {
        "gun": gun,
        "role": role,
        "key_ids": [k.key_id for k in added],
        "paths": args.paths if args.paths is not None else [""],
        "files": changed,
    }
    emit(args, data, lambda: f"delegated {role} of {gun} to {', '.join(data['key_ids'])}")


def cmd_delegation_remove(args: argparse.Namespace) -> None:
    """Remove a delegation role (its tags become invisible)."""
    gun = validate_gun(args.gun)
    role = _delegation_role(args.role)
    repo = _open_repo(args, gun)
    with _key_source(args) as keys, _changes(repo) as changed:
        parent = _signer_for(keys, repo, _parent(role))
        repo.remove_delegation(role, parent)
        _refresh(repo, keys)
    emit(
        args,
        {"gun": gun, "role": role, "files": changed},
        lambda: f"removed delegation {role} from {gun}",
    )


def cmd_rotate(args: argparse.Namespace) -> None:
    """Replace the key of root, targets, a delegation, or the snapshot or timestamp."""
    gun = validate_gun(args.gun)
    role = validate_role(args.role)
    repo = _open_repo(args, gun)
    if role in ("snapshot", "timestamp"):
        _rotate_server_role(args, repo, role)
        return
    if role in ("root", "targets"):
        _check_root_change(repo)
    with _key_source(args) as keys, _changes(repo) as changed:
        old = {k.canonical_id for k in _role_keys(repo, role).values()}
        # Found before a new key is made, so that a caller who cannot approve
        # the change leaves no orphan key behind.
        approver = _signer_for(keys, repo, "root" if role in ("root", "targets") else _parent(role))
        new = keys.get(args.key) if args.key else keys.create(gun, role)
        if new.key_id in old:
            raise InvalidArgument(f"key {new.key_id} already signs {role}")
        if role == "root":
            # The old root key signs too, so clients that trust it accept the new root.
            repo.rotate_root_key(approver, new)
        elif role == "targets":
            repo.rotate_targets_key(approver, new)
        else:
            repo.rotate_delegation_key(role, approver, new)
        _refresh(repo, keys)
    data = {
        "gun": gun,
        "role": role,
        "old_key_ids": sorted(old),
        "new_key_id": new.key_id,
        "files": changed,
    }
    emit(args, data, lambda: f"rotated {role} of {gun}: {', '.join(sorted(old))} -> {new.key_id}")


def _rotate_server_role(args: argparse.Namespace, repo: TrustRepo, role: str) -> None:
    """Rotate the snapshot or timestamp key.

    Where this directory signs the role (offline, or ``--local-snapshot``) the
    new key is made in signerd. Otherwise the Notary server makes it
    (``POST .../ROLE.key``); a new root.json signed by the root key lists it
    and is published at once, so the server signs with it from then on.
    """
    gun = repo.gun
    if args.key:
        raise InvalidArgument(f"--key does not apply to {role}: the new key is made for you")
    _check_root_change(repo)
    settings = _load_settings(repo)
    local = settings.local_roles is not None and role in settings.local_roles
    pending = sorted(repo.pending()) if not local and repo.published() else []
    if pending:
        raise FailedPrecondition(
            f"{gun} has unpublished changes ({', '.join(pending)}): publish them with "
            f"'signerctl trust publish {gun}' before rotating the {role} key"
        )
    client = None if local else _notary(args, settings)
    old = sorted(repo.root().roles[role].keyids)
    published: list[str] = []
    with _key_source(args) as keys, _changes(repo) as changed:
        root_signer = _signer_for(keys, repo, "root")  # before the server makes a key
        signer = keys.create(gun, role) if local else None
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
        _refresh(repo, keys)
        if client is not None:
            files = repo.pending()
            client.publish(gun, files)  # a refusal rolls the local change back
            repo.mark_published(files)
            published = sorted(files)
    if client is not None:
        try:
            _pull_into(repo, client)
        except SignerdError as e:
            raise FailedPrecondition(
                f"published {', '.join(published)}, but the server's trust data does not "
                f"verify: {e}"
            ) from None
    data = {
        "gun": gun,
        "role": role,
        "old_key_ids": old,
        "new_key_id": new_key.key_id,
        "files": changed,
        "published": published,
    }
    where = f"; published {', '.join(published)}" if published else ""
    line = f"rotated {role} of {gun}: {', '.join(old)} -> {new_key.key_id}{where}"
    emit(args, data, lambda: line)


def cmd_publish(args: argparse.Namespace) -> None:
    """Upload changed metadata, then fetch back and verify what the server now serves."""
    gun = validate_gun(args.gun)
    repo = _open_repo(args, gun)
    client = _notary(args, _load_settings(repo))
    files = repo.pending()
    if not files:
        emit(args, {"gun": gun, "published": []}, lambda: f"{gun}: nothing to publish")
        return
    client.publish(gun, files)
    repo.mark_published(files)
    try:
        result, _ = _pull_into(repo, client)
    except SignerdError as e:
        raise FailedPrecondition(
            f"published {', '.join(sorted(files))}, but the server's trust data "
            f"does not verify: {e}"
        ) from None
    data = {"gun": gun, "published": sorted(files), "versions": dict(result.state.versions)}
    emit(args, data, lambda: f"published {', '.join(sorted(files))} for {gun}")


def cmd_pull(args: argparse.Namespace) -> None:
    """Fetch and verify a repository's trust data into the trust directory."""
    gun = validate_gun(args.gun)
    repo = TrustRepo(trust_dir(args), gun)
    pending = [] if args.force else sorted(repo.pending())
    if pending:
        raise FailedPrecondition(
            f"{gun} has unpublished changes ({', '.join(pending)}): publish them, "
            "or pull --force to discard them"
        )
    settings = _load_settings(repo)
    client = _notary(args, settings)
    result, before = _pull_into(repo, client, reset_trust=args.reset_trust)
    if settings.server is None:  # later publishes and pulls need no --server
        _save_settings(repo, Settings(client.url, settings.local_roles, client.ca_file))
    data: dict[str, Any] = {
        "gun": gun,
        "tags": [t.to_dict() for t in result.tags],
        "versions": dict(result.state.versions),
    }
    lines = [f"pulled {gun}: {len(result.tags)} signed tag(s), root version {result.root.version}"]
    if args.reset_trust:
        lines.insert(0, _reset_report(data, before, result))
    emit(args, data, lambda: "\n".join(lines))


def _reset_report(
    data: dict[str, Any], before: TrustedState | None, result: VerifiedRepository
) -> str:
    """Record and describe a re-trust: the old and the new root key IDs."""
    old = _root_key_ids(before.root if before else None)
    new = sorted(result.root.roles["root"].keyids)
    data["old_root_key_ids"], data["new_root_key_ids"] = old, new
    return (
        f"re-trusted {result.gun}: root keys {', '.join(old) or 'none'} -> {', '.join(new)}"
    )


def _tag_table(tags: Sequence[dict[str, Any]]) -> str:
    rows = [("TAG", "DIGEST", "SIZE", "SIGNED BY")]
    rows += [(t["name"], "sha256:" + t["digest"], str(t["size"]), t["role"]) for t in tags]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]) for r in rows
    )


def _signing_keys(result: VerifiedRepository, role: str) -> list[str]:
    """Canonical IDs of the keys trusted to sign a verified targets role."""
    if role == "targets":
        keys = result.root.role_keys(role)
    else:
        keys = result.targets[_parent(role)].delegation_role_keys(role)
    return sorted(k.canonical_id for k in keys.values())


def cmd_inspect(args: argparse.Namespace) -> None:
    """Verify as a Content Trust client does and list the signed tags (or one tag)."""
    gun, tag = split_reference(args.ref, tag_required=False)
    repo = _open_repo(args, gun)
    files = repo.files()
    if "timestamp" not in files:
        raise NotFound(
            f"{gun} has no timestamp.json in {repo.path}: publish it (the Notary server "
            "signs the timestamp), or pull it"
        )
    before = _load_state(repo, reset_trust=args.reset_trust)
    try:
        result = verify_repository(gun, files, trusted=None if args.reset_trust else before)
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
    _save_state(repo, result.state)
    tags = [result.tag(tag)] if tag is not None else list(result.tags)
    signers = {role: _signing_keys(result, role) for role in result.targets}
    rows = [t.to_dict() for t in tags]
    data = {"gun": gun, "tags": rows, "versions": dict(result.state.versions), "signers": signers}
    report = _reset_report(data, before, result) + "\n" if args.reset_trust else ""
    emit(args, data, lambda: report + (_tag_table(rows) if rows else f"{gun}: no signed tags"))


# --- argv ----------------------------------------------------------------------------------


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    # signerctl's global options, accepted after the command too (SUPPRESS, so
    # that they do not overwrite a value given before it). --server is the
    # Notary server inside trust commands; signerd's address is --signerd here.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    add_client_options(common, "--signerd")

    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument(
        "--trust-dir",
        type=Path,
        help="trust data directory (default: $SIGNERD_TRUST_DIR or ~/.local/share/signerd/trust)",
    )
    trust.add_argument(
        "--local",
        action="store_true",
        help="use the tokens directly (no daemon), for offline root ceremonies",
    )
    trust.add_argument(
        "--daemon-config",
        type=Path,
        help="signerd.toml naming the tokens, with --local (default: the embedded daemon's)",
    )

    notary = argparse.ArgumentParser(add_help=False)
    notary.add_argument(
        "--server",
        dest="notary_url",
        metavar="URL",
        help="Notary server, e.g. https://notary.example.com:4443",
    )
    notary.add_argument("--ca", type=Path, help="CA file for the Notary server's TLS certificate")
    notary.add_argument("--username", help="basic auth user ($SIGNERD_NOTARY_USERNAME)")
    notary.add_argument(
        "--password-file", type=Path, help="basic auth password file ($SIGNERD_NOTARY_PASSWORD)"
    )
    notary.add_argument("--token-file", type=Path, help="bearer token file ($SIGNERD_NOTARY_TOKEN)")
    return common, trust, notary


def _one_line(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Report file system errors (unwritable trust dir, missing file) as one line."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> None:
        try:
            func(args)
        except BrokenPipeError:
            raise  # signerctl's main() handles a closed stdout
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise SignerdError(f"{where}{e.strerror or e}") from None

    return run


def register(sub: Any) -> None:
    """Add ``trust`` and its commands to signerctl's sub-parsers."""
    common, trust, notary = _parents()

    def command(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], None],
        helptext: str,
        *extra: argparse.ArgumentParser,
    ) -> argparse.ArgumentParser:
        # allow_abbrev=False: "--password x" must not pass as "--password-file x".
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=helptext, parents=[common, trust, *extra], allow_abbrev=False
        )
        p.set_defaults(func=_one_line(func))
        return p

    group = sub.add_parser("trust", help="Docker Content Trust: sign tags, delegate, publish")
    cmds = group.add_subparsers(dest="trust_cmd", required=True)

    p = command(cmds, "init", cmd_init, "create a repository's trust data", notary)
    p.add_argument("gun")
    p.add_argument("--root-key", metavar="KEYID", help="use this root key instead of a new one")
    p.add_argument(
        "--local-snapshot",
        action="store_true",
        help="keep the snapshot key in signerd instead of the Notary server",
    )

    p = command(cmds, "sign", cmd_sign, "sign a tag")
    p.add_argument("ref", metavar="GUN:TAG")
    p.add_argument("--digest", required=True, help="manifest digest, sha256:HEX")
    p.add_argument("--size", required=True, type=whole_number(0, MAX_SIZE, "bytes"),
                   help="manifest size in bytes")
    p.add_argument(
        "--role", help="targets role (default: targets/releases if delegated, else targets)"
    )

    p = command(cmds, "unsign", cmd_unsign, "remove a tag's signature")
    p.add_argument("ref", metavar="GUN:TAG")
    p.add_argument("--role", help="targets role (default as for sign)")

    delegation = cmds.add_parser("delegation", help="manage delegation roles")
    dcmds = delegation.add_subparsers(dest="delegation_cmd", required=True)
    p = command(dcmds, "add", cmd_delegation_add, "delegate targets/NAME to keys")
    p.add_argument("gun")
    p.add_argument("role", metavar="targets/NAME")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEYID",
        help="a key signerd holds (repeatable)",
    )
    p.add_argument(
        "--pubkey",
        action="append",
        default=[],
        metavar="FILE",
        help="a PEM public key or certificate (repeatable)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        metavar="PREFIX",
        help='tag prefixes the role may sign (default: "", every tag)',
    )
    p = command(dcmds, "remove", cmd_delegation_remove, "remove a delegation role")
    p.add_argument("gun")
    p.add_argument("role", metavar="targets/NAME")

    p = command(cmds, "rotate", cmd_rotate, "replace the key of a role", notary)
    p.add_argument("gun")
    p.add_argument(
        "role", metavar="ROLE", help="root, targets, targets/NAME, snapshot or timestamp"
    )
    p.add_argument("--key", metavar="KEYID", help="the new key (default: create one)")

    p = command(cmds, "publish", cmd_publish, "upload to the Notary server", notary)
    p.add_argument("gun")

    p = command(cmds, "pull", cmd_pull, "fetch and verify from the Notary server", notary)
    p.add_argument("gun")
    p.add_argument("--force", action="store_true", help="discard unpublished local changes")
    p.add_argument(
        "--reset-trust",
        action="store_true",
        help="forget the pinned root and trust the server's (prints old and new root key IDs)",
    )

    p = command(cmds, "inspect", cmd_inspect, "verify and list signed tags")
    p.add_argument("ref", metavar="GUN[:TAG]")
    p.add_argument(
        "--reset-trust",
        action="store_true",
        help="forget the pinned root and trust the local one (prints old and new root key IDs)",
    )
