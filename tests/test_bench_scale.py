"""bench/scale.py (issue 24 §2's 10,000-key figures) runs end to end on a tiny token,
so it cannot rot. Not a timed test: it checks the shape of the results and that each
daemon life served, signed and made keys, never how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scale_bench_measures_both_daemon_lives(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--keys", "4", "--rounds", "1", "--signs", "3",
         "--creates", "2", "--cache", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(out.read_text())
    (point,) = doc["points"]
    assert point["keys"] == 4 and point["audit"] is True
    assert len(point["ready_s"]) == 2 and all(r > 0 for r in point["ready_s"])
    first, again = point["first"], point["restart"]
    assert first["exit_code"] == 0 and again["exit_code"] == 0
    assert first["listed_keys"] == again["listed_keys"] == 4
    assert first["first_sign_new_ms"]["n"] == 3
    assert again["first_sign_ms"]["n"] == again["sign_again_ms"]["n"] == 3
    assert again["create_ms"]["n"] == 2
    (row,) = doc["summary"]
    for name in ("create_p99_ms", "sign_again_p99_ms", "ready_minus_c_initialize_first_s",
                 "ready_minus_c_initialize_restart_s"):
        assert row[name]["median"] is not None, name
    assert "| 4 |" in run.stdout  # the README's table
