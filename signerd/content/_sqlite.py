"""The embedded watermark store: one SQLite file (Python's sqlite3).

Each compare-and-set is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock is taken
before the watermark is read, so two processes (``workers = N``, or two daemons on one
host) sharing the file are serialised. WAL journal and ``synchronous = FULL``: a commit is
on disk before the signature is returned. One connection per store, used under a lock
(the transaction is a few statements; SQLite serialises writers anyway). The check before
signing (``previous``) reads outside any transaction: in WAL mode it waits for no writer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from signerd.content._errors import StateUnavailable
from signerd.content._store import Sql, SqlStore

BUSY_TIMEOUT = 30.0  # seconds a transaction waits for another process's write lock


class SqliteStore(SqlStore):
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

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        # No transaction: each SELECT reads on its own, and in WAL mode a reader takes no
        # lock a writer waits for (SqlStore.previous: a check ahead of the compare-and-set).
        with self._lock:
            try:
                cur = self._db.cursor()
                try:
                    yield cur
                finally:
                    cur.close()
            except sqlite3.Error as e:
                raise StateUnavailable(f"state database {self.path}: {e}") from None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
