"""The benchmark harness runs end to end (tiny smoke mode), so it cannot rot.

Not a timed test: it checks the structure of the results and that every
point signed something, never how fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_m(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the repository root, as its README runs it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_bench_smoke_run_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    run = _python_m("bench.run", "--smoke", "--out", str(out),
                    "--cache", str(tmp_path / "cache"), timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())

    assert doc["schema"] == 1
    assert doc["machine"]["cpus"] >= 1 and len(doc["machine"]["load_before"]) == 3
    assert doc["settings"]["algorithms"] == ["ecdsa-p256"]
    for rates in (doc["token_rate"], doc["token_rate_signerd_path"]):
        assert rates["ecdsa-p256"]["1"] > 0 and rates["ecdsa-p256"]["2"] > 0

    # The Notary-compatible Sign is served. SignStream may not be yet, and the Go
    # peer (notary-signer) is measured only where Debian's notary package is installed.
    skipped = doc["skipped"]
    assert set(skipped) <= {"stream", "peer"}, skipped
    if "stream" in skipped:
        assert "UNIMPLEMENTED" in skipped["stream"]
    peer = os.access("/usr/bin/notary-signer", os.X_OK)
    assert ("peer" in skipped) == (not peer)
    if not peer:  # regression: a run without notary-signer recorded nothing (issue 21 §1)
        assert "not installed" in skipped["peer"] and "notary" in skipped["peer"]
    points = {(r["rpc"], r.get("server", ""), r["callers"]): r for r in doc["results"]}
    rows = [("v1", ""), ("notary", ""), ("batch", ""), ("floor", "sync"), ("floor", "aio"),
            ("floor-stream", "sync"), ("floor-stream", "aio")]
    rows += [] if "stream" in skipped else [("stream", "")]
    rows += [("peer", "notary-signer")] if peer else []
    assert set(points) == {(rpc, server, c) for rpc, server in rows for c in (1, 4)}
    for (rpc, _, _), r in points.items():
        assert r["ops_per_s"] > 0 and r["requests"] > 0 and r["errors"] == 0, r
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["daemon_cpu_cores"] >= 0 and r["loadgen_cpu_cores"] > 0
        assert r["other_cpu_cores"] >= 0
        assert r["daemon_rss_mib"] > 0
        if rpc.startswith("floor"):  # the no-op server: no key, nothing to compare
            assert r["algorithm"] == "-" and r["vs_token_2t"] is None
        elif rpc == "peer":  # notary-signer's keys are in its memory, not on the token
            assert r["algorithm"] == "ecdsa-p256" and r["vs_token_2t"] is None
            assert r["daemon_cpu_cores"] > 0
        else:
            assert r["algorithm"] == "ecdsa-p256" and r["vs_token_2t"] > 0

    # The best floor: per row and callers, the faster of the two stacks.
    best = {(b["rpc"], b["callers"]): b for b in doc["best_floor"]}
    assert set(best) == {(rpc, c) for rpc in ("floor", "floor-stream") for c in (1, 4)}
    for (rpc, c), b in best.items():
        assert b["ops_per_s"] == max(points[(rpc, m, c)]["ops_per_s"] for m in ("sync", "aio"))
    if peer:  # notary-signer and signerd's Notary Sign, measured one right after the other
        assert [(p["callers"], p["round"]) for p in doc["peer_pairs"]] == [(1, 0), (4, 0)]
        for pair in doc["peer_pairs"]:
            assert pair["signerd_notary"]["ops_per_s"] > 0
            assert pair["signerd_notary"]["errors"] == 0
        assert "notary_signer" in doc["machine"]["versions"]

    # Issue 15's targets, computed from the points above (no 16-caller point in a smoke run).
    t = doc["targets"]
    assert t["v1_p50_1_vs_floor"] == round(
        points[("v1", "", 1)]["p50_ms"] / best[("floor", 1)]["p50_ms"], 3)
    assert t["v1_16_vs_floor"] is None and t["notary_16_vs_floor"] is None
    assert t["ceiling_p50_1"] > 1
    if peer:
        top = max(r["ops_per_s"] for r in doc["results"] if r["rpc"] == "peer")
        assert t["peer_best"] == top
        assert t["batch_1_vs_peer"] == round(points[("batch", "", 1)]["ops_per_s"] / top, 3)

    daemon = doc["daemon"]
    assert daemon["exit_code"] == 0 and daemon["start_seconds"] > 0
    assert daemon["rss_mib"] > 0 and daemon["hwm_mib"] >= daemon["max_process_rss_mib"]
    assert 0 < daemon["pss_mib"] <= daemon["rss_mib"]

    many = doc["many_keys"]
    # The daemon adds its audit checkpoint key (issue 25) to the 50 of the cached token.
    assert many["keys"] == many["keys_loaded"] - 1 == 50
    assert many["start_seconds"] > 0 and many["p50_ms"] > 0 and many["rss_mib"] > 0
    assert many["exit_code"] == 0
    assert many["breakdown"]["keys"] == 51 and many["breakdown"]["key_listing_s"] > 0
    if doc["settings"]["workers"] > 1:
        assert many["one_worker"]["processes"] == 1

    table = run.stdout
    assert "| v1 | ecdsa-p256 | 1 |" in table and "| 50 keys |" in table
    assert "| floor (aio) | - | 4 |" in table and "Best Python floor" in table
    assert "| v1 Sign, 16 callers / best floor | not measured | >= 0.8x |" in table


def test_ab_runs_variants_in_alternation_and_reports_medians(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    run = _python_m("bench.ab", "--variant", "cpu_affinity=none",
                    "--variant", "cpu_affinity=spread,threads=4", "--set", "workers=1",
                    "--rounds", "2", "--callers", "2", "--duration", "0.5", "--out", str(out),
                    timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["workers"] == 1 and doc["callers"] == 2
    assert [r["variant"] for r in doc["results"]] == [
        {"cpu_affinity": "none"}, {"cpu_affinity": "spread", "threads": 4}]
    for r in doc["results"]:
        assert len(r["rounds"]) == 2
        assert r["ops_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["cpu_us_per_signature"] > 0 and r["switches_per_request"] > 0
    assert "| cpu_affinity=spread, threads=4 |" in run.stdout


def test_ab_compares_the_floor_stacks_on_streams(tmp_path: Path) -> None:
    out = tmp_path / "ab-floor.json"
    run = _python_m("bench.ab", "--floor", "--rpc", "stream", "--variant", "mode=sync,workers=1",
                    "--variant", "mode=aio,workers=1", "--rounds", "1", "--callers", "2",
                    "--duration", "0.5", "--out", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["floor"] and doc["rpc"] == "stream"
    assert [r["variant"] for r in doc["results"]] == [{"mode": "sync", "workers": 1},
                                                       {"mode": "aio", "workers": 1}]
    for r in doc["results"]:
        assert r["ops_per_s"] > 0 and r["loadgen_cpu_cores"] > 0
    assert "| mode=aio, workers=1 |" in run.stdout


def test_ab_refuses_a_setting_it_cannot_vary() -> None:
    run = _python_m("bench.ab", "--variant", "colour=red", "--variant", "workers=2", timeout=60)
    assert run.returncode == 2
    assert "expected NAME=VALUE with NAME in" in run.stderr and "Traceback" not in run.stderr
    run = _python_m("bench.ab", "--variant", "mode=aio", "--variant", "workers=2", timeout=60)
    assert run.returncode == 2 and "mode needs --floor" in run.stderr


def test_handler_bench_times_the_sign_handler_and_its_parts() -> None:
    run = _python_m("bench.handler", "--calls", "20", timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = dict(line.strip("| ").split(" | ") for line in run.stdout.splitlines()[2:])
    assert set(rows) == {"Sign handler, whole", "KeyService.sign_with (token)", "audit line",
                         "policy decision", "key lookup", "key ID check"}
    micros = {name: float(value.replace(",", "")) for name, value in rows.items()}
    assert all(us > 0 for us in micros.values())
    assert micros["Sign handler, whole"] > micros["KeyService.sign_with (token)"]
