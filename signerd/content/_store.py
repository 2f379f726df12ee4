"""The watermark store: its interface, its schema, and the SQL both databases share.

The shape of Web3Signer's slashing protection: a small repository interface with two
implementations (SQLite for one daemon, PostgreSQL for replicas), plain SQL, no ORM. The
check and the record are one transaction holding the GUN's lock (SQLite: ``BEGIN
IMMEDIATE``, a database-wide write lock; PostgreSQL: the GUN's row ``FOR UPDATE``), so two
replicas racing to sign versions of one GUN are ordered: once one has recorded version N,
the other's check sees N.

The SQL below is written once with ``?`` placeholders; PostgreSQL's driver gets ``%s``.
Both databases accept ``INSERT … ON CONFLICT … DO UPDATE … WHERE`` (SQLite 3.24+).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol

from signerd.content._checks import Previous, Update, Watermark
from signerd.content._parse import Delegation

# Each entry migrates the schema from version i to i + 1; applied at open, in order, in
# one transaction. Never edit an entry once released: append one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE guns (gun TEXT PRIMARY KEY)",
        "CREATE TABLE watermarks (gun TEXT NOT NULL, role TEXT NOT NULL, version BIGINT NOT "
        "NULL, digest TEXT NOT NULL, signed_at TEXT NOT NULL, PRIMARY KEY (gun, role))",
        "CREATE TABLE meta_watermarks (gun TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT "
        "NULL, version BIGINT NOT NULL, PRIMARY KEY (gun, role, name))",
        "CREATE TABLE file_versions (gun TEXT NOT NULL, role TEXT NOT NULL, sha256 TEXT NOT "
        "NULL, version BIGINT NOT NULL, PRIMARY KEY (gun, role, sha256))",
        "CREATE TABLE delegations (gun TEXT NOT NULL, role TEXT NOT NULL, paths TEXT NOT NULL, "
        "PRIMARY KEY (gun, role))",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS signerd_schema (version INTEGER NOT NULL)"


@dataclass(frozen=True)
class RoleState:
    """One recorded watermark, as ``signerctl state show GUN`` would list it."""

    role: str
    version: int
    digest: str
    signed_at: str  # RFC 3339 UTC of the last signature at this version
    meta_versions: tuple[tuple[str, int], ...]  # (meta entry, highest version referenced)


Decide = Callable[[Previous], Update]


class WatermarkStore(Protocol):
    """Durable watermarks per GUN and role, shared by every replica using the store.

    Every method raises StateUnavailable when the database cannot be used.
    """

    def previous(self, gun: str, role: str, hashes: Sequence[tuple[str, str]]) -> Previous:
        """What is recorded now for ``gun``/``role`` (``file_versions`` for ``hashes``,
        pairs of referenced role and SHA-256 hex), read without taking the GUN's lock and
        without writing: a check ahead of :meth:`compare_and_set`, never instead of it."""
        ...

    def compare_and_set(self, gun: str, role: str, hashes: Sequence[tuple[str, str]],
                        decide: Decide, now: datetime, file_sha256: str | None = None) -> Update:
        """Under the GUN's lock: load ``Previous`` (with ``file_versions`` for ``hashes``,
        pairs of referenced role and SHA-256 hex), call ``decide``, record its Update and
        commit. ``file_sha256``: also remember, in the same transaction, that the file of
        ``role`` with this SHA-256 hex is the Update's version (see :meth:`record_file`).
        An exception from ``decide`` rolls back and propagates: nothing is recorded."""
        ...

    def record_file(self, gun: str, role: str, sha256: str, version: int) -> None:
        """Remember that the file of ``role`` with this SHA-256 hex is ``version``."""
        ...

    def versions(self, gun: str) -> list[RoleState]:
        """Every role's watermark recorded for ``gun``, by role name."""
        ...

    def reset(self, gun: str) -> int:
        """Forget everything recorded for ``gun`` (admin); returns the rows removed."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


Cursor = Any  # a DB-API cursor: sqlite3.Cursor or psycopg.Cursor


class Sql:
    """The statements both stores run; ``mark`` is the driver's placeholder."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def q(self, text: str) -> str:
        """``text`` with ``?`` replaced by the driver's placeholder."""
        return text if self.mark == "?" else text.replace("?", self.mark)

    def migrate(self, cur: Cursor) -> int:
        """Bring the schema to SCHEMA_VERSION inside the caller's transaction (which holds
        the lock); returns the version found. Raises RuntimeError for a newer schema."""
        cur.execute(SCHEMA_TABLE)
        cur.execute("SELECT version FROM signerd_schema")
        row = cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"the state database has schema version {found}, newer than this signerd's "
                f"{SCHEMA_VERSION}: upgrade signerd")
        for statements in MIGRATIONS[found:]:
            for s in statements:
                cur.execute(s)
        if row is None:
            cur.execute(self.q("INSERT INTO signerd_schema (version) VALUES (?)"),
                        (SCHEMA_VERSION,))
        elif found < SCHEMA_VERSION:
            cur.execute(self.q("UPDATE signerd_schema SET version = ?"), (SCHEMA_VERSION,))
        return found

    def load(self, cur: Cursor, gun: str, role: str,
             hashes: Sequence[tuple[str, str]]) -> Previous:
        """What the checks need, read inside the caller's locked transaction (or, for
        ``previous``, outside any). One statement, so one round trip to PostgreSQL: the
        four tables' rows, each tagged with its table (w, m, f, d)."""
        parts = ["SELECT 'w', version, digest, '' FROM watermarks WHERE gun = ? AND role = ?",
                 "SELECT 'm', version, name, '' FROM meta_watermarks WHERE gun = ? AND role = ?",
                 "SELECT 'd', 0, paths, '' FROM delegations WHERE gun = ? AND role = ?"]
        params: list[object] = [gun, role, gun, role, gun, role]
        if hashes:
            wanted = " OR ".join(["(role = ? AND sha256 = ?)"] * len(hashes))
            # ``wanted`` is placeholders only; the values go as parameters.
            parts.append(f"SELECT 'f', version, sha256, role FROM file_versions "  # noqa: S608
                         f"WHERE gun = ? AND ({wanted})")
            params.append(gun)
            for file_role, sha in hashes:
                params += [file_role, sha]
        cur.execute(self.q(" UNION ALL ".join(parts)), params)
        mark: Watermark | None = None
        meta: dict[str, int] = {}
        files: dict[tuple[str, str], int] = {}
        delegation: Delegation | None = None
        for table, version, text, extra in cur.fetchall():
            if table == "w":
                mark = Watermark(int(version), str(text))
            elif table == "m":
                meta[str(text)] = int(version)
            elif table == "f":
                files[(str(extra), str(text))] = int(version)
            else:
                delegation = Delegation.from_json(str(text))
        return Previous(mark, MappingProxyType(meta), MappingProxyType(files), delegation)

    def apply(self, cur: Cursor, gun: str, role: str, update: Update, now: datetime) -> None:
        """Record ``update`` (only ever raising versions) inside the caller's transaction."""
        cur.execute(self.q(
            "INSERT INTO watermarks (gun, role, version, digest, signed_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (gun, role) DO UPDATE SET version = excluded.version, "
            "digest = excluded.digest, signed_at = excluded.signed_at "
            "WHERE excluded.version >= watermarks.version"),
            (gun, role, update.version, update.digest, now.strftime("%Y-%m-%dT%H:%M:%SZ")))
        for name, version in update.meta_versions.items():
            cur.execute(self.q(
                "INSERT INTO meta_watermarks (gun, role, name, version) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (gun, role, name) DO UPDATE SET version = excluded.version "
                "WHERE excluded.version > meta_watermarks.version"),
                (gun, role, name, version))
        for child, delegation in update.delegations.items():
            cur.execute(self.q(
                "INSERT INTO delegations (gun, role, paths) VALUES (?, ?, ?) "
                "ON CONFLICT (gun, role) DO UPDATE SET paths = excluded.paths"),
                (gun, child, delegation.to_json()))

    def record_file(self, cur: Cursor, gun: str, role: str, sha256: str, version: int) -> None:
        """Insert or keep the hash → version mapping of one file."""
        cur.execute(self.q(
            "INSERT INTO file_versions (gun, role, sha256, version) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (gun, role, sha256) DO NOTHING"), (gun, role, sha256, version))

    def versions(self, cur: Cursor, gun: str) -> list[RoleState]:
        """Every role's watermark for ``gun``."""
        cur.execute(self.q("SELECT role, name, version FROM meta_watermarks WHERE gun = ? "
                           "ORDER BY role, name"), (gun,))
        meta: dict[str, list[tuple[str, int]]] = {}
        for role, name, version in cur.fetchall():
            meta.setdefault(str(role), []).append((str(name), int(version)))
        cur.execute(self.q("SELECT role, version, digest, signed_at FROM watermarks "
                           "WHERE gun = ? ORDER BY role"), (gun,))
        return [RoleState(str(r), int(v), str(d), str(t), tuple(meta.get(str(r), [])))
                for r, v, d, t in cur.fetchall()]

    def reset(self, cur: Cursor, gun: str) -> int:
        """Delete every row of ``gun``; returns how many."""
        removed = 0
        for table in ("watermarks", "meta_watermarks", "file_versions", "delegations"):
            # The table names are this module's constants, never input.
            cur.execute(self.q(f"DELETE FROM {table} WHERE gun = ?"), (gun,))  # noqa: S608
            removed += max(cur.rowcount, 0)
        cur.execute(self.q("DELETE FROM guns WHERE gun = ?"), (gun,))  # the lock row
        return removed


class SqlStore:
    """What both stores do the same way, each operation one transaction of
    :meth:`_transaction` (the subclass's: its connection, its errors). Subclasses
    set ``_sql`` and may lock the GUN inside the transaction (:meth:`_lock_gun`)."""

    _sql: Sql

    def _transaction(self) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reads only, which take no lock (the subclasses read without a
        transaction)."""
        return self._transaction()

    def _lock_gun(self, cur: Cursor, gun: str) -> None:
        """Hold GUN ``gun`` for the rest of the transaction. SQLite's ``BEGIN
        IMMEDIATE`` already holds the whole database: nothing to do."""

    def previous(self, gun: str, role: str, hashes: Sequence[tuple[str, str]]) -> Previous:
        """See WatermarkStore.previous."""
        with self._read() as cur:
            return self._sql.load(cur, gun, role, hashes)

    def compare_and_set(self, gun: str, role: str, hashes: Sequence[tuple[str, str]],
                        decide: Decide, now: datetime, file_sha256: str | None = None) -> Update:
        """See WatermarkStore.compare_and_set."""
        with self._transaction() as cur:
            self._lock_gun(cur, gun)
            update = decide(self._sql.load(cur, gun, role, hashes))
            self._sql.apply(cur, gun, role, update, now)
            if file_sha256 is not None:
                self._sql.record_file(cur, gun, role, file_sha256, update.version)
        return update

    def record_file(self, gun: str, role: str, sha256: str, version: int) -> None:
        """See WatermarkStore.record_file."""
        with self._transaction() as cur:
            self._sql.record_file(cur, gun, role, sha256, version)

    def versions(self, gun: str) -> list[RoleState]:
        """See WatermarkStore.versions."""
        with self._transaction() as cur:
            return self._sql.versions(cur, gun)

    def reset(self, gun: str) -> int:
        """See WatermarkStore.reset."""
        with self._transaction() as cur:
            self._lock_gun(cur, gun)
            return self._sql.reset(cur, gun)
