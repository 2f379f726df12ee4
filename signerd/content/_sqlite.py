"""The embedded watermark store: one SQLite file (Python's sqlite3).

Each compare-and-set is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock is taken
before the watermark is read, so two processes (``workers = N``, or two daemons on one
host) sharing the file are serialised. WAL journal and ``synchronous = FULL``: a commit is
on disk before the signature is returned. One connection per store, used under a lock
(the transaction is a few statements; SQLite serialises writers anyway).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from signerd.content._checks import Update
from signerd.content._errors import StateUnavailable
from signerd.content._store import Decide, RoleState, Sql

BUSY_TIMEOUT = 30.0  # seconds a transaction waits for another process's write lock


class SqliteStore:
    """A WatermarkStore in a SQLite file; the schema is created or migrated on open.

    Raises StateUnavailable when the file cannot be opened or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sql = Sql("?")
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are begun here, explicitly, as IMMEDIATE.
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        except (sqlite3.Error, OSError) as e:
            raise StateUnavailable(f"cannot open the state database {path}: {e}") from None
        with self._transaction() as cur:
            try:
                self._sql.migrate(cur)
            except RuntimeError as e:
                raise StateUnavailable(str(e)) from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            try:  # a closed connection (the daemon stopping) fails closed too
                cur = self._db.cursor()
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StateUnavailable(f"state database {self.path}: {e}") from None
            try:
                yield cur
            except sqlite3.Error as e:
                self._db.rollback()
                raise StateUnavailable(f"state database {self.path}: {e}") from None
            except BaseException:
                self._db.rollback()
                raise
            try:
                cur.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.rollback()
                raise StateUnavailable(f"state database {self.path}: {e}") from None
            finally:
                cur.close()

    def compare_and_set(self, gun: str, role: str, hashes: Sequence[tuple[str, str]],
                        decide: Decide, now: datetime) -> Update:
        """See WatermarkStore.compare_and_set."""
        with self._transaction() as cur:
            update = decide(self._sql.load(cur, gun, role, hashes))
            self._sql.apply(cur, gun, role, update, now)
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
            return self._sql.reset(cur, gun)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
