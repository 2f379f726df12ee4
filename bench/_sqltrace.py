"""``python -m bench._sqltrace serve ...``: ``signerd`` (argv as ``python -m signerd.daemon``)
with every statement its SQLite connections run appended to the file ``$BENCH_SQL_TRACE``,
one per line (``sqlite3.Connection.set_trace_callback``).

For bench/content_batch.py only, which counts the watermark store's statements per
SignBatch: the daemon itself has no such hook. Run it with ``workers = 1`` (workers are
fresh interpreters started as ``python -m signerd.daemon``, without this wrapper).
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Any


def main() -> int:
    """Install the trace on every ``sqlite3.connect`` of this process, then run signerd."""
    out = open(os.environ["BENCH_SQL_TRACE"], "a", buffering=1)  # noqa: SIM115 - process-long
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(*args, **kwargs)
        db.set_trace_callback(lambda sql: out.write(" ".join(sql.split()) + "\n"))
        return db

    sqlite3.connect = traced  # type: ignore[assignment]
    from signerd.daemon._main import main as signerd_main

    return signerd_main()


if __name__ == "__main__":
    sys.exit(main())
