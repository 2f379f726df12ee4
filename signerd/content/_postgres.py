"""The watermark store shared by replicas: PostgreSQL through psycopg 3 and psycopg_pool.

Each compare-and-set is one transaction (READ COMMITTED) that first makes sure the GUN has
a row in ``guns`` (``INSERT … ON CONFLICT DO NOTHING``), then locks it with
``SELECT … FOR UPDATE``: every later statement of the transaction reads what the previous
holder committed, so replicas racing on one GUN are serialised and never on two GUNs.
Migrations run at open under a transaction-scoped advisory lock, so replicas starting
together migrate once. The check before signing (``previous``) reads with no transaction
and no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool

from signerd.content._errors import StateUnavailable
from signerd.content._store import Sql, SqlStore

# psycopg_pool logs every failed connection attempt as a multi-line warning while it
# retries; signerd reports the outcome itself (StateUnavailable, the health loop's line).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

POOL_TIMEOUT = 10.0  # seconds a request waits for a pooled connection
MIGRATION_LOCK = 0x5167_6E65_7264  # pg_advisory_xact_lock key of signerd's migrations


def _unavailable(e: Exception) -> StateUnavailable:
    # The first line only: psycopg's messages name host and user, never the password.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StateUnavailable(f"state database (PostgreSQL) unavailable: {first}")


class PostgresStore(SqlStore):
    """A WatermarkStore in PostgreSQL; ``url`` is a libpq connection URL.

    ``max_connections`` bounds the pool (one per concurrent signature in flight);
    ``timeout`` is how long (seconds) opening and each request wait for a connection. Raises
    StateUnavailable when the server cannot be reached or refuses.
    """

    def __init__(self, url: str, max_connections: int = 8,
                 timeout: float = POOL_TIMEOUT) -> None:
        self._sql = Sql("%s")
        try:
            self._pool = psycopg_pool.ConnectionPool(
                url, min_size=1, max_size=max_connections, timeout=timeout,
                kwargs={"autocommit": True}, open=False)
            self._pool.open(wait=True, timeout=timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise _unavailable(e) from None
        try:
            with self._transaction() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                self._sql.migrate(cur)
        except RuntimeError as e:
            self._pool.close()
            raise StateUnavailable(str(e)) from None

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise _unavailable(e) from None

    @contextmanager
    def _read(self) -> Iterator[Any]:
        # No transaction (the pool's connections autocommit): each SELECT on its own, no
        # BEGIN and COMMIT round trips (SqlStore.previous: a check ahead of the
        # compare-and-set, which reads again under the GUN's lock).
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise _unavailable(e) from None

    def _lock_gun(self, cur: Any, gun: str) -> None:
        cur.execute("INSERT INTO guns (gun) VALUES (%s) ON CONFLICT DO NOTHING", (gun,))
        cur.execute("SELECT gun FROM guns WHERE gun = %s FOR UPDATE", (gun,))

    def close(self) -> None:
        """Close the pool."""
        self._pool.close()
