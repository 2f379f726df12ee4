"""Pulling a Notary repository in TUF's client order (TUF specification
§5.3-5.6), over a fetch such as :meth:`signerd.trust.notary_http.NotaryClient.get`:
root first, verified against what was trusted; then the timestamp (at most
``MAX_TIMESTAMP_SIZE``), verified with the root's keys; then the snapshot, at
most the length the timestamp declares and with its hashes, verified; then
each targets file at most the length the verified snapshot declares. Nothing
unverified decides what else is downloaded."""

from __future__ import annotations

from typing import Protocol

from signerd.errors import InvalidArgument, quoted
from signerd.keys import validate_role
from signerd.trust.errors import NotaryServerError, VerificationError
from signerd.trust.metadata import Envelope, FileMeta, Root, Snapshot, Timestamp
from signerd.trust.verify import TrustedState, verify_role, verify_root

MAX_METADATA_SIZE = 100 << 20  # notary.MaxDownloadSize
MAX_TIMESTAMP_SIZE = 1 << 20  # notary.MaxTimestampSize: read before anything says a length
MAX_PULLED_ROLES = 10_000  # targets files one pull fetches (signerd's bound)
MAX_ROOT_STEPS = 1000  # intermediate roots fetched to follow rotations (signerd's bound)


class Fetch(Protocol):
    """Fetches ``name``.json of ``gun``: at most ``limit`` bytes, else
    NotaryServerError saying "larger than"; MetadataNotFound for a 404."""

    def __call__(self, gun: str, name: str, limit: int = MAX_METADATA_SIZE) -> bytes: ...


def pull_repository(get: Fetch, gun: str, *, trusted_root_version: int | None = None,
                    trusted: TrustedState | None = None) -> dict[str, bytes]:
    """Fetch with ``get`` root, timestamp, snapshot, targets and every
    delegation the snapshot lists, in TUF's client order, and return them by
    role name; what :meth:`signerd.trust.notary_http.NotaryClient.pull` does
    (its docstring says how ``trusted`` and ``trusted_root_version`` are
    used). Raises VerificationError, NotaryServerError, MetadataNotFound."""
    if trusted is not None and trusted_root_version is None:
        trusted_root_version = trusted.versions.get("root")
    files = {"root": get(gun, "root")}
    if trusted_root_version is not None:
        current = Envelope.from_bytes(files["root"], "root").signed.get("version")
        if isinstance(current, int) and not isinstance(current, bool):
            if current - trusted_root_version > MAX_ROOT_STEPS:
                # Each step is one request: a hostile version must not make millions.
                raise VerificationError(
                    "root",
                    f"version {current} is more than {MAX_ROOT_STEPS} rotations ahead "
                    f"of the trusted version {trusted_root_version}",
                )
            for v in range(trusted_root_version + 1, current):
                files[f"{v}.root"] = get(gun, f"{v}.root")
    intermediates = {int(name.split(".", 1)[0]): data for name, data in files.items()
                     if name.endswith(".root")}
    root = verify_root(gun, files["root"], trusted_root=trusted.root if trusted else None,
                       intermediates=intermediates)
    files["timestamp"] = get(gun, "timestamp", limit=MAX_TIMESTAMP_SIZE)
    timestamp = _verified(root, "timestamp", files["timestamp"], trusted)
    assert isinstance(timestamp, Timestamp)
    if "snapshot" not in timestamp.meta:
        raise VerificationError("timestamp", "lists no snapshot")
    files["snapshot"] = _get_declared(get, gun, "snapshot", timestamp.meta["snapshot"],
                                      "timestamp")
    snapshot = _verified(root, "snapshot", files["snapshot"], trusted)
    assert isinstance(snapshot, Snapshot)
    roles = sorted(r for r in snapshot.meta if r == "targets" or r.startswith("targets/"))
    if len(roles) > MAX_PULLED_ROLES:
        raise VerificationError("snapshot", f"lists {len(roles)} targets files, more than "
                                            f"the {MAX_PULLED_ROLES} signerctl fetches")
    for role in roles:
        try:
            validate_role(role)  # a hostile snapshot must not steer paths
        except InvalidArgument:
            raise VerificationError(
                "snapshot", f"lists {quoted(role)}, not a valid Notary role name"
            ) from None
        files[role] = _get_declared(get, gun, role, snapshot.meta[role], "snapshot")
    if "targets" not in files:
        raise VerificationError("snapshot", "lists no targets")
    return files


def _get_declared(get: Fetch, gun: str, name: str, meta: FileMeta, by: str) -> bytes:
    """Fetch ``name`` at most the length ``by`` (a verified file) declares for it,
    and check its hashes."""
    if meta.length > MAX_METADATA_SIZE:
        raise VerificationError(by, f"declares {meta.length} bytes for {name}, more than "
                                    f"the {MAX_METADATA_SIZE} a notary client downloads")
    try:
        data = get(gun, name, limit=meta.length)
    except NotaryServerError as e:
        if "larger than" in str(e):
            raise VerificationError(
                name, f"the server sent more than the {meta.length} bytes {by}.json "
                      "declares") from None
        raise
    meta.check(data, name)
    return data


def _verified(root: Root, role: str, data: bytes, trusted: TrustedState | None) -> object:
    if role not in root.roles:
        raise VerificationError("root", f"lists no {role} keys")
    return verify_role(role, data, root.role_keys(role), root.roles[role].threshold,
                       trusted=trusted)
