"""The content checks' cost per signature: parse + decide alone, then the whole
``ContentGuard.check_and_record`` on SQLite and on PostgreSQL.

    python -m bench.content [--rounds 200] [--json bench/results/content-latest.json]

Payloads: a Notary timestamp padded to about 1 KB, and a Notary targets file of about
100 KB (1,050 targets); the same sizes in TUF 1.0 (python-tuf). Each round signs the next
version of one GUN and role, so every round reads and raises a watermark. PostgreSQL is a
fresh server from tests/_postgres.py with fsync on (a commit reaches the disk, as in
production); SQLite is a file in a temporary directory (WAL, synchronous FULL).
Reported: median and mean microseconds per call, over ``rounds`` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from signerd.content import ContentConfig, ContentGuard, Limits, open_store, parse_state
from signerd.content._checks import Previous, decide
from signerd.content._parse import parse_payload
from tests import _postgres
from tests.content_helpers import DAY, NOW, n_timestamp, t_targets, t_timestamp

GUN = "bench.example/acme/app"


def _padded_notary_timestamp(version: int) -> bytes:
    raw = json.loads(n_timestamp(version, expires=7 * DAY))
    raw["meta"]["snapshot"]["custom"] = {"pad": "x" * 620}  # to about 1 KB
    from signerd.canonicaljson import encode_canonical

    return encode_canonical(raw)


def _notary_targets(version: int, count: int = 1050) -> bytes:
    from tests.content_helpers import n_targets

    return n_targets(version, tuple(f"app/v{i}.{version}" for i in range(count)))


def _tuf_timestamp(version: int) -> bytes:
    raw = json.loads(t_timestamp(version))
    raw["meta"]["snapshot.json"]["hashes"] = {"sha256": "ab" * 32, "sha512": "cd" * 64}
    raw["pad"] = "x" * 750  # unrecognised fields are kept by python-tuf: to about 1 KB
    from securesystemslib.formats import encode_canonical

    text = encode_canonical(raw)
    assert isinstance(text, str)
    return text.encode()


def _tuf_targets(version: int, count: int = 880) -> bytes:
    return t_targets(version, tuple(f"app/v{i}.{version}" for i in range(count)))


PAYLOADS: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "notary timestamp 1KB": ("timestamp", _padded_notary_timestamp),
    "notary targets 100KB": ("targets", _notary_targets),
    "tuf timestamp 1KB": ("timestamp", _tuf_timestamp),
    "tuf targets 100KB": ("targets", _tuf_targets),
}


def _time(calls: list[Callable[[], object]]) -> dict[str, float]:
    spent = []
    for call in calls:
        start = time.perf_counter_ns()
        call()
        spent.append((time.perf_counter_ns() - start) / 1000)
    return {"median_us": round(statistics.median(spent), 1),
            "mean_us": round(statistics.fmean(spent), 1)}


def _pure(payload: bytes, role: str, limits: Limits) -> object:
    return decide(parse_payload(payload, role), GUN, role, limits, NOW, Previous())


def measure(rounds: int, pg_url: str, sqlite_url: str) -> dict[str, Any]:
    """Per payload: pure checks, SQLite, PostgreSQL (µs per call)."""
    out: dict[str, Any] = {}
    limits = ContentConfig().default
    for name, (role, make) in PAYLOADS.items():
        payloads = [make(v) for v in range(1, rounds + 1)]
        row: dict[str, Any] = {"bytes": len(payloads[-1])}

        row["parse+decide"] = _time([partial(_pure, p, role, limits) for p in payloads])
        for store_name, url in (("sqlite", sqlite_url), ("postgresql", pg_url)):
            guard = ContentGuard(ContentConfig(), open_store(parse_state({"url": url}, Path("/"))))
            gun = f"{GUN}/{store_name}/{role}/{name.split()[0]}"
            row[store_name] = _time([partial(guard.check_and_record, gun, role, p, NOW)
                                     for p in payloads])
            guard.close()
        out[name] = row
    return out


def main() -> None:
    """Run the measurement and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = _postgres.start(fsync=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(args.rounds, server.url, f"sqlite://{Path(tmp) / 'state.db'}")
    finally:
        server.stop()
    print(f"{'payload':24} {'bytes':>7} {'parse+decide':>14} {'sqlite':>10} {'postgresql':>11}"
          "   (median µs per signature)")
    for name, row in results.items():
        print(f"{name:24} {row['bytes']:>7} {row['parse+decide']['median_us']:>14} "
              f"{row['sqlite']['median_us']:>10} {row['postgresql']['median_us']:>11}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "results": results}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
