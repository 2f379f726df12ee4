"""The embedded watermark store: one SQLite file (Python's sqlite3).

Each compare-and-set runs in a ``BEGIN IMMEDIATE`` transaction: SQLite's write lock is
taken before the watermark is read, so two processes (``workers = N``, or two daemons on
one host) sharing the file are serialised. WAL journal and ``synchronous = FULL``: a commit
is on disk before the signature is returned.

Group commit: the write lock is database-wide and each commit waits for the disk (about a
millisecond here), so compare-and-sets of one process that arrive while another is being
committed wait for it, then go together in the next transaction, one flush for all of
them. They are decided one after another in arrival order inside it, each seeing the ones
before it; each runs under a SAVEPOINT, so a refused one is rolled back alone and records
nothing; each caller returns only once the transaction holding its record has committed,
and if that commit fails every caller in it gets StateUnavailable. The check before signing
(``previous``) reads on a second connection, outside any transaction: in WAL mode it waits
for no writer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from signerd.content._checks import Update
from signerd.content._errors import StateUnavailable
from signerd.content._store import Decide, Sql, SqlStore

T = TypeVar("T")

BUSY_TIMEOUT = 30.0  # seconds a transaction waits for another process's write lock


class SqliteStore(SqlStore):
    """A WatermarkStore in a SQLite file; the schema is created or migrated on open.

    Raises StateUnavailable when the file cannot be opened or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sql = Sql("?")
        self._lock = threading.Lock()  # the writing connection, and the transaction on it
        self._queue: list[_Pending] = []  # compare-and-sets waiting for the next commit
        self._queue_lock = threading.Lock()
        self._read_lock = threading.Lock()
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
        try:
            self._reader = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                           check_same_thread=False)
        except sqlite3.Error as e:
            self._db.close()
            raise StateUnavailable(f"cannot open the state database {path}: {e}") from None

    def compare_and_set(self, gun: str, role: str, hashes: Sequence[tuple[str, str]],
                        decide: Decide, now: datetime, file_sha256: str | None = None) -> Update:
        """See WatermarkStore.compare_and_set; committed with the others waiting (see the
        module)."""
        item = _Pending(gun, role, hashes, decide, now, file_sha256)
        with self._queue_lock:
            self._queue.append(item)
        with self._lock:
            if not item.done:  # else a transaction begun after it was queued committed it
                self._commit_queued()
        if item.update is None:
            raise item.error or StateUnavailable(f"state database {self.path}: not recorded")
        return item.update

    def _commit_queued(self) -> None:
        """Under ``_lock``: one transaction deciding and recording every compare-and-set
        queued once the write lock is held, in order; each is marked done."""
        batch: list[_Pending] = []
        try:
            with self._transaction(locked=True) as cur:
                with self._queue_lock:  # what queued while we waited for the write lock too
                    batch, self._queue = self._queue, []
                self._decide_and_apply(cur, batch)
        except Exception as e:  # noqa: BLE001 - StateUnavailable, or a lone item's refusal
            if not batch:  # BEGIN failed: fail what is queued
                with self._queue_lock:
                    batch, self._queue = self._queue, []
            for item in batch:
                if item.error is None:
                    item.update, item.error = None, e
        finally:
            for item in batch:
                if item.update is None and item.error is None:
                    item.error = StateUnavailable(f"state database {self.path}: interrupted")
                item.done = True

    def _decide_and_apply(self, cur: sqlite3.Cursor, batch: list[_Pending]) -> None:
        """Each item in order: decide, then record. Several: each under a SAVEPOINT, a
        refused one rolled back alone and its refusal kept for its caller; one: its
        refusal raised (the transaction rolls back). An sqlite3.Error fails them all."""
        alone = len(batch) == 1
        for item in batch:
            if not alone:
                cur.execute("SAVEPOINT item")
            try:
                update = item.decide(self._sql.load(cur, item.gun, item.role, item.hashes))
                self._sql.apply(cur, item.gun, item.role, update, item.now)
                if item.file_sha256 is not None:
                    self._sql.record_file(cur, item.gun, item.role, item.file_sha256,
                                          update.version)
            except sqlite3.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the item's refusal, for its caller
                if alone:
                    raise
                item.error = e
                cur.execute("ROLLBACK TO item")
            else:
                item.update = update
            if not alone:
                cur.execute("RELEASE item")

    def _transaction(self, locked: bool = False) -> AbstractContextManager[sqlite3.Cursor]:
        """A ``BEGIN IMMEDIATE`` transaction on the writing connection (``locked``: the
        caller holds ``_lock`` already)."""
        if locked:
            return self._immediate()
        return _holding(self._lock, self._immediate())

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Cursor]:
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
        with self._read_lock:
            try:
                cur = self._reader.cursor()
                try:
                    yield cur
                finally:
                    cur.close()
            except sqlite3.Error as e:
                raise StateUnavailable(f"state database {self.path}: {e}") from None

    def close(self) -> None:
        """Close the connections."""
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()


@dataclass
class _Pending:
    """One compare-and-set waiting for a transaction, and, once ``done``, its result."""

    gun: str
    role: str
    hashes: Sequence[tuple[str, str]]
    decide: Decide
    now: datetime
    file_sha256: str | None
    done: bool = False
    update: Update | None = None
    error: BaseException | None = None


@contextmanager
def _holding(lock: threading.Lock, inner: AbstractContextManager[T]) -> Iterator[T]:
    with lock, inner as value:
        yield value
