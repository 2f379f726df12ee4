"""SignBatch with items for many GUNs: how many watermark statements and transactions one
batch costs, on SQLite and on PostgreSQL (issue 23's third benchmark). Counted, not guessed.

    python -m bench.content_batch [--items 100] [--guns 1,10,100] [--repeat 3]
                                  [--json bench/results/content-batch-latest.json]

About a minute. Two signerd daemons (``signerd serve``, mutual TLS, audit log,
``workers = 1``, the health probe off so that it adds no statement), each on its own
SoftHSM token with P-256 ``timestamp`` metadata keys of GUNs ``bench.example/batch/FMT/gN``:

``sqlite``      the embedded store, the daemon started through bench/_sqltrace.py, which
                writes every statement its SQLite connection runs to a file
                (``set_trace_callback``): what runs in the daemon, as it runs;
``postgresql``  a fresh PostgreSQL (tests/_postgres.py, fsync on) with ``log_statement =
                all``: every statement the server received, from its log, by backend.

Each batch is ``items`` v1 SignRequests spread round-robin over ``guns`` GUNs, each item
the next version of its GUN's timestamp: Notary's (canonical JSON, meta by hash) or TUF
1.0's (OLPC canonical JSON, meta by version). Every item must sign. Reported per batch:
transactions (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``BEGIN``), statements (each one a
round trip to PostgreSQL), the statements by kind, and the batch's wall time (median over
``repeat`` batches; on a shared machine a rough figure, the counts are exact).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/content_batch.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._loadgen import Target  # noqa: E402
from bench.content_load import timestamp as notary_timestamp  # noqa: E402
from bench.run import Env, Hsm, Settings, client_channel, log, start_daemon  # noqa: E402

STORES = ("sqlite", "postgresql")
FORMATS = ("notary", "tuf")
# PostgreSQL's log line, with log_line_prefix '%p|': the backend's pid, then the statement.
_PG_LINE = re.compile(r"^(\d+)\|LOG:  (?:statement|execute [^:]*): (.*)$")


def tuf_timestamp(version: int) -> bytes:
    """python-tuf's canonical JSON of a TUF 1.0 timestamp ``signed`` at ``version``."""
    from securesystemslib.formats import encode_canonical

    expires = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = encode_canonical({"_type": "timestamp", "spec_version": "1.0.31",
                             "version": version, "expires": expires,
                             "meta": {"snapshot.json": {"version": version}}})
    assert isinstance(text, str)
    return text.encode()


def kind(statement: str) -> str:
    """A statement's kind: ``BEGIN``, ``COMMIT``, or its verb and first table."""
    s = " ".join(statement.split())
    if s.upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
        return s.split()[0].upper()
    verb = s.split()[0].upper()
    table = re.search(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", s, re.IGNORECASE)
    return f"{verb} {table.group(1) if table else '?'}" + (" FOR UPDATE"
                                                           if s.endswith("FOR UPDATE") else "")


@dataclass
class Store:
    """One daemon, where its statements are read from, and its keys and versions."""

    name: str
    log: Path  # the trace file (SQLite) or the server's log (PostgreSQL)
    target: Target | None = None
    daemon: Any = None
    keys: dict[str, list[str]] = field(default_factory=dict)  # format -> key per GUN
    versions: Counter[str] = field(default_factory=Counter)  # key ID -> last version
    marks: Any = None  # PostgreSQL: a connection of our own that logs a marker statement

    def statements(self, offset: int) -> list[str]:
        """The statements logged after byte ``offset`` of the log."""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if self.name == "sqlite":
            return [line for line in text.splitlines() if line]
        return [m.group(2) for line in text.splitlines() if (m := _PG_LINE.match(line))]

    def logged(self, offset: int, timeout: float = 30) -> list[str]:
        """The statements logged after byte ``offset`` once every statement sent before
        this call is in the log. SQLite: the daemon writes each statement's line (line
        buffered) before running it, so a batch's lines are all there when its answer
        has arrived. PostgreSQL: a backend logs a statement as it receives it; a marker
        statement sent now, from a connection of ours, is logged after all of them: its
        line is waited for, and the statements before it are the batch's."""
        if self.name == "sqlite":
            return self.statements(offset)
        from psycopg import sql

        marker = f"bench-content-batch-mark-{secrets.token_hex(8)}"
        self.marks.execute(sql.SQL("SELECT {}").format(sql.Literal(marker)))
        deadline = time.monotonic() + timeout
        while True:
            statements = self.statements(offset)
            for i, statement in enumerate(statements):
                if marker in statement:
                    return statements[:i]
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not log the marker in {timeout}s")
            time.sleep(0.01)


def create_keys(target: Target, fmt: str, count: int) -> list[str]:
    """``count`` P-256 timestamp metadata keys, one per GUN, over v1 CreateKey."""
    from signerd.v1 import signer_pb2 as pb
    from signerd.v1 import signer_pb2_grpc as pb_grpc

    with client_channel(target) as ch:
        stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
        return [stub.CreateKey(pb.CreateKeyRequest(
            gun=f"bench.example/batch/{fmt}/g{g}", role="timestamp", algorithm="ecdsa-p256",
            purpose=pb.KEY_PURPOSE_METADATA)).key_id for g in range(count)]


def one_batch(store: Store, fmt: str, items: int, guns: int) -> dict[str, Any]:
    """Send one SignBatch of ``items`` over ``guns`` GUNs; count what the store ran."""
    from signerd.v1 import signer_pb2 as pb
    from signerd.v1 import signer_pb2_grpc as pb_grpc

    assert store.target is not None
    requests = []
    for i in range(items):
        key_id = store.keys[fmt][i % guns]
        gun = f"bench.example/batch/{fmt}/g{i % guns}"
        store.versions[key_id] += 1
        version = store.versions[key_id]
        message = notary_timestamp(gun, version) if fmt == "notary" else tuf_timestamp(version)
        requests.append(pb.SignRequest(key_id=key_id, message=message))
    offset = store.log.stat().st_size
    with client_channel(store.target) as ch:
        stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        answer = stub.SignBatch(pb.SignBatchRequest(requests=requests), timeout=120)
        ms = (time.perf_counter() - t0) * 1e3
    failed = [item.error for item in answer.items if item.code]
    if failed:
        raise RuntimeError(f"{store.name}: {len(failed)} of {items} items refused: {failed[0]}")
    statements = store.logged(offset)
    kinds = Counter(kind(s) for s in statements)
    return {"transactions": kinds["BEGIN"], "statements": len(statements),
            "kinds": dict(sorted(kinds.items())), "ms": round(ms, 1)}


def _config(env: Env, name: str, s: Settings, pg_url: str) -> Path:
    hsm = Hsm.create(env.dir / f"hsm-{name}", env.module)
    config = env.write_config(name, hsm, s)
    # The health probe asks the store every health_interval: not during the count.
    text = config.read_text().replace("[server]\n", "[server]\nhealth_interval = 3600\n", 1)
    if name == "postgresql":
        text += f'\n[state]\nurl = "{pg_url}"\n'
    config.write_text(text)
    return config


def run(items: int, guns: list[int], repeat: int) -> dict[str, Any]:
    """Start PostgreSQL and both daemons, send the batches, count, stop everything."""
    import psycopg

    from tests import _postgres

    server = _postgres.start(fsync=True)
    stores: list[Store] = []
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("ALTER SYSTEM SET log_line_prefix = '%p|'")
            conn.execute("SELECT pg_reload_conf()")
        with tempfile.TemporaryDirectory(prefix="signerd-content-batch-") as tmp, \
                ExitStack() as daemons:
            # The daemons stop (ExitStack) before their directory goes: a daemon whose
            # token, state and audit log were removed under it took seconds to exit.
            env = Env.create(Path(tmp))
            s = replace(Settings(), workers=1)
            trace = env.dir / "sqlite-statements.log"
            trace.touch()
            for name in STORES:
                config = _config(env, name, s, server.url)
                store = Store(name, trace if name == "sqlite" else server.dir / "server.log")
                store.daemon = (start_daemon(config, module="bench._sqltrace",
                                             env={"BENCH_SQL_TRACE": str(trace)})
                                if name == "sqlite" else start_daemon(config))
                stores.append(store)
                daemons.callback(store.daemon.stop)
                if name == "postgresql":
                    store.marks = daemons.enter_context(
                        psycopg.connect(server.url, dbname="postgres", autocommit=True))
                store.target = env.target(store.daemon.info["tcp"])
                store.keys = {fmt: create_keys(store.target, fmt, max(guns)) for fmt in FORMATS}
            results = []
            for fmt in FORMATS:
                for m in guns:
                    for store in stores:
                        batches = [one_batch(store, fmt, items, m) for _ in range(repeat)]
                        counts = {(b["transactions"], b["statements"]) for b in batches}
                        ms = round(statistics.median(b["ms"] for b in batches), 1)
                        row = {"store": store.name, "format": fmt, "items": items, "guns": m,
                               **batches[-1], "ms": ms, "same_every_batch": len(counts) == 1}
                        results.append(row)
                        log(f"{store.name} {fmt} {items} items / {m} GUNs: "
                            f"{row['transactions']} transactions, {row['statements']} "
                            f"statements, {row['ms']} ms")
            return {"items": items, "guns": guns, "repeat": repeat, "results": results}
    finally:
        server.stop()


def table(doc: dict[str, Any]) -> str:
    """The counts as a Markdown table."""
    lines = ["| store | payload | items | GUNs | transactions | statements | per item | "
             "batch ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["results"]:
        lines.append(f"| {r['store']} | {r['format']} timestamp | {r['items']} | {r['guns']} | "
                     f"{r['transactions']} | {r['statements']} | "
                     f"{r['statements'] / r['items']:.1f} | {r['ms']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the count, print the table and optionally write the JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.content_batch",
                                description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=100, help="items per batch")
    p.add_argument("--guns", default="1,10,100", help="GUNs per batch, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="batches per shape")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    try:
        guns = [int(g) for g in a.guns.split(",")]
    except ValueError:
        p.error(f"--guns is a comma-separated list of numbers, not {a.guns!r}")
    if not 1 <= a.items <= 1000 or a.repeat < 1 or any(not 1 <= g <= a.items for g in guns):
        p.error("--items 1 to 1000 (SignBatch's limit), --repeat at least 1, each of --guns "
                "from 1 to --items")
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = run(a.items, guns, a.repeat)
    doc["started"] = started
    print(table(doc))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
