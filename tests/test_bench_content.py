"""The content-check benchmarks of issue 23 run end to end (tiny settings), so they
cannot rot. Not timed: they check the results' structure, that every call signed, that
the variants alternate, and that the statement counts are the store's real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_m(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the repository root, as the README runs it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_content_load_alternates_checks_off_sqlite_and_postgresql(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = _python_m("bench.content_load", "--rounds", "2", "--duration", "0.25", "--callers", "2",
                    "--json", str(out), timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["off", "sqlite", "postgresql"]
    for r in doc["results"].values():
        assert len(r["rounds"]) == 2
        for point in r["rounds"]:
            assert point["ops_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
        assert r["ops_per_s"]["min"] <= r["ops_per_s"]["median"] <= r["ops_per_s"]["max"]
    # Alternation: the log names the variants A B C A B C.
    order = [line.split()[4].rstrip(":") for line in run.stderr.splitlines() if " round " in line]
    assert order == ["off", "sqlite", "postgresql"] * 2
    assert "| checks, PostgreSQL |" in run.stdout


def test_content_batch_counts_one_transaction_per_item(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    run = _python_m("bench.content_batch", "--items", "6", "--guns", "1,3", "--repeat", "2",
                    "--json", str(out), timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = {(r["store"], r["format"], r["guns"]): r for r in json.loads(out.read_text())["results"]}
    assert len(rows) == 8
    for (store, fmt, _), r in rows.items():
        assert r["same_every_batch"]
        # Each item: one transaction, its compare-and-set (a Notary item records its
        # file's hash in it); the check before signing reads outside any transaction.
        assert r["transactions"] == 6
        if fmt == "notary":
            assert r["kinds"]["INSERT file_versions"] == 6
        assert r["kinds"]["BEGIN"] == r["kinds"]["COMMIT"] == r["transactions"]
        assert r["kinds"]["INSERT watermarks"] == 6
        if store == "postgresql":  # the GUN's row lock, once per compare-and-set
            assert r["kinds"]["SELECT guns FOR UPDATE"] == 6
