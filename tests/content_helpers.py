"""Valid metadata payloads for the content-check tests: Notary's through
signerd.trust.metadata, TUF 1.0's through python-tuf's Metadata API, each serialised the
way its signer canonicalises it."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuf.api import metadata as tuf
from tuf.api.serialization.json import CanonicalJSONSerializer

from signerd.canonicaljson import encode_canonical
from signerd.content import (
    ContentConfig,
    ContentGuard,
    ContentStale,
    RoleState,
    WatermarkStore,
    open_store,
    parse_state,
)
from signerd.content._checks import Previous, Update
from signerd.content._sqlite import SqliteStore
from signerd.content._store import Decide
from signerd.trust import metadata as notary

NOW = dt.datetime(2031, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
GUN = "docker.io/acme/app"
DAY = dt.timedelta(days=1)


def guard(path: Path, config: ContentConfig | None = None) -> ContentGuard:
    """A guard on a SQLite file (a new store object each call: a "restart")."""
    return ContentGuard(config or ContentConfig(), SqliteStore(path))


# --- Notary -----------------------------------------------------------------------------


def n_timestamp(version: int = 1, snapshot: bytes = b"snapshot v1",
                expires: dt.timedelta = 7 * DAY) -> bytes:
    """A Notary timestamp referencing the file ``snapshot`` (its length and hashes)."""
    body = notary.Timestamp(version=version, expires=NOW + expires,
                            meta={"snapshot": notary.FileMeta.for_bytes(snapshot)})
    return encode_canonical(body.to_dict())


def n_snapshot(version: int = 1, targets: bytes = b"targets v1", root: bytes = b"root v1",
               expires: dt.timedelta = 365 * DAY) -> bytes:
    """A Notary snapshot referencing the files ``targets`` and ``root``."""
    body = notary.Snapshot(version=version, expires=NOW + expires, meta={
        "root": notary.FileMeta.for_bytes(root), "targets": notary.FileMeta.for_bytes(targets)})
    return encode_canonical(body.to_dict())


def n_targets(version: int = 1, targets: tuple[str, ...] = ("latest",),
              delegations: dict[str, list[str]] | None = None,
              expires: dt.timedelta = 365 * DAY) -> bytes:
    """A Notary targets file (or delegation) listing ``targets``, delegating to
    ``delegations`` (role → path prefixes)."""
    body = notary.Targets(
        version=version, expires=NOW + expires,
        targets={t: notary.FileMeta.for_bytes(t.encode(), ("sha256",)) for t in targets},
        delegations=[notary.DelegatedRole(name, [], 1, paths)
                     for name, paths in (delegations or {}).items()])
    return encode_canonical(body.to_dict())


def n_root(version: int = 1, expires: dt.timedelta = 3650 * DAY) -> bytes:
    """A Notary root.json body with no keys (enough for the content checks' parse)."""
    value: dict[str, Any] = {
        "_type": "Root", "consistent_snapshot": False, "keys": {},
        "expires": notary.format_expires(NOW + expires), "version": version,
        "roles": {r: {"keyids": [], "threshold": 1} for r in notary.BASE_ROLES},
    }
    return encode_canonical(value)


# --- TUF 1.0 (python-tuf) ---------------------------------------------------------------


def _tuf(signed: tuf.Signed) -> bytes:
    return CanonicalJSONSerializer().serialize(signed)


def t_timestamp(version: int = 1, snapshot_version: int = 1,
                expires: dt.timedelta = 30 * DAY) -> bytes:
    """A python-tuf timestamp referencing snapshot.json ``snapshot_version``."""
    return _tuf(tuf.Timestamp(version=version, expires=NOW + expires,
                              snapshot_meta=tuf.MetaFile(snapshot_version)))


def t_snapshot(version: int = 1, meta: dict[str, int] | None = None,
               expires: dt.timedelta = 30 * DAY) -> bytes:
    """A python-tuf snapshot; ``meta`` maps file names to versions."""
    files = {name: tuf.MetaFile(v) for name, v in (meta or {"targets.json": 1}).items()}
    return _tuf(tuf.Snapshot(version=version, expires=NOW + expires, meta=files))


def t_targets(version: int = 1, targets: tuple[str, ...] = ("app.txt",),
              delegations: dict[str, list[str]] | None = None,
              hash_prefixes: dict[str, list[str]] | None = None,
              expires: dt.timedelta = 30 * DAY) -> bytes:
    """A python-tuf targets file listing ``targets``, delegating by paths or hash prefixes."""
    signed = tuf.Targets(version=version, expires=NOW + expires)
    for t in targets:
        signed.targets[t] = tuf.TargetFile.from_data(t, t.encode(), ["sha256"])
    roles = {name: tuf.DelegatedRole(name, [], 1, False, paths=paths)
             for name, paths in (delegations or {}).items()}
    roles.update({name: tuf.DelegatedRole(name, [], 1, False, path_hash_prefixes=prefixes)
                  for name, prefixes in (hash_prefixes or {}).items()})
    if roles:
        signed.delegations = tuf.Delegations(keys={}, roles=roles)
    return _tuf(signed)


def t_root(version: int = 1, expires: dt.timedelta = 365 * DAY) -> bytes:
    """A python-tuf root with no keys."""
    return _tuf(tuf.Root(version=version, expires=NOW + expires))


# --- races ------------------------------------------------------------------------------


class Observed:
    """A real store whose decisions are timestamped (CLOCK_MONOTONIC, comparable across
    processes) while the store's lock is held: the order of the stamps is commit order."""

    def __init__(self, inner: WatermarkStore) -> None:
        self.inner = inner
        self.accepted: list[tuple[int, int]] = []  # (monotonic ns, version)

    def previous(self, gun: str, role: str, hashes: Sequence[tuple[str, str]]) -> Previous:
        return self.inner.previous(gun, role, hashes)

    def compare_and_set(self, gun: str, role: str, hashes: Sequence[tuple[str, str]],
                        decide: Decide, now: dt.datetime,
                        file_sha256: str | None = None) -> Update:
        def stamped(prev: Previous) -> Update:
            update = decide(prev)
            self.accepted.append((time.monotonic_ns(), update.version))
            return update
        return self.inner.compare_and_set(gun, role, hashes, stamped, now, file_sha256)

    def record_file(self, gun: str, role: str, sha256: str, version: int) -> None:
        self.inner.record_file(gun, role, sha256, version)

    def versions(self, gun: str) -> list[RoleState]:
        return self.inner.versions(gun)

    def reset(self, gun: str) -> int:
        return self.inner.reset(gun)

    def close(self) -> None:
        self.inner.close()


def race_worker(url: str, gun: str, seed: int, rounds: int) -> list[tuple[int, int]]:
    """Sign ``rounds`` timestamps of random versions 1-40 for ``gun`` on the store at ``url``
    (a state URL); returns the accepted ones, stamped in commit order. Rollbacks are
    expected refusals; anything else fails the worker."""
    rng = random.Random(seed)
    store = Observed(open_store(parse_state({"url": url}, Path("/"))))
    g = ContentGuard(ContentConfig(), store)
    try:
        for _ in range(rounds):
            try:
                g.check_and_record(gun, "timestamp", n_timestamp(rng.randint(1, 40)), NOW)
            except ContentStale:
                pass
    finally:
        g.close()
    return store.accepted
