"""The audit log as a transparency log (issue 25): what the tree costs per line,
how fast checkpoints are signed on a SoftHSM Ed25519 key, and how long a start
with a 1,000,000-line log takes.

    python -m bench.tlog [--lines 1000000] [--json bench/results/tlog-latest.json]

1. Per line: ``AuditLog.write_many`` in groups of 64 records (SignBatch's group
   commit), without and with the tree, alternating over 5 rounds (medians; the
   difference is the tree's cost, within the disk's noise), and the tree's own
   work, ``AuditTree.append``, timed alone.
2. Checkpoints: sign a checkpoint after every group of 64 lines (persist tiles
   + sign on the token + write the file), as fast as they go: the rate at
   which the log could be checkpointed at SignBatch's full speed (the daemon
   signs at most one per ``checkpoint_interval``).
3. Start-up: open a log of ``--lines`` lines whose tree was checkpointed at
   close (the start check reads the frontier and the checkpoint's line only),
   and the same log with its last 10,000 lines written after the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from signerd import metrics
from signerd.audit import AuditLog, Checkpointer, CheckpointKey, TlogConfig
from signerd.audit._tree import AuditTree

GROUP = 64
ROUNDS = 5  # alternating rounds of the per-line comparison


def _record(i: int) -> dict[str, Any]:
    return {"request_id": f"{i:016x}", "identity": "CN=bench", "peer": "ipv4:127.0.0.1:5000",
            "transport": "tcp", "operation": "sign", "key_id": "ab" * 32,
            "gun": "docker.io/bench/app", "role": "targets", "token": "hsm",
            "payload_sha256": "cd" * 32, "decision": "allow", "status": "OK",
            "latency_ms": 0.123}


def _token_key(directory: Path) -> tuple[CheckpointKey, Any]:
    from signerd.config import parse_config
    from signerd.service import KeyService, checkpoint_key
    from tests.conftest import TOKENS, make_hsm

    hsm = make_hsm(directory / "hsm")
    import os

    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    cfg = parse_config({"tokens": [hsm.token_table(TOKENS[0])],
                        "policy": {"file": "p"}}, directory)
    service = KeyService.open(cfg)
    return checkpoint_key(service, cfg.audit_tlog, directory / "audit.log"), service


def _writes(path: Path, n: int, cp: Checkpointer | None, sign_each: bool) -> float:
    log = AuditLog(path, tree=cp)
    if cp is not None:
        cp.start(log)
    records = [_record(i) for i in range(GROUP)]
    start = time.perf_counter()
    for _ in range(n // GROUP):
        log.write_many(records)
        if sign_each and cp is not None:
            cp.checkpoint()
    elapsed = time.perf_counter() - start
    if cp is not None:
        cp.stop()
    log.close()
    return elapsed


def _append_only(directory: Path, n: int) -> float:
    """Microseconds per line that AuditTree.append takes alone (hashing the leaf and
    the interior nodes it completes), in groups of GROUP lines, best of ROUNDS."""
    lines = [json.dumps(_record(i)).encode() for i in range(GROUP)]
    best = float("inf")
    for r in range(ROUNDS):
        tree = AuditTree(directory / str(r), 0)
        start = time.perf_counter()
        for _ in range(n // GROUP):
            tree.append(lines)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def run(lines: int) -> dict[str, Any]:
    out: dict[str, Any] = {"group": GROUP}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        key, service = _token_key(d)
        cfg = TlogConfig(interval=3600.0, origin="bench.example/audit")
        # Without and with the tree in alternation (a shared, noisy machine): the
        # medians over ROUNDS, and the tree's own work timed alone (AuditTree.append).
        n = 16_000
        plain_us, tree_us = [], []
        for r in range(ROUNDS):
            plain = _writes(d / f"plain{r}.log", n, None, False)
            tree = _writes(d / f"tree{r}.log", n, Checkpointer(key, cfg, metrics), False)
            plain_us.append(plain / n * 1e6)
            tree_us.append(tree / n * 1e6)
        out["per_line_us_without_tree"] = round(statistics.median(plain_us), 2)
        out["per_line_us_with_tree"] = round(statistics.median(tree_us), 2)
        out["tree_cost_per_line_us_median_of_differences"] = round(statistics.median(
            t - p for p, t in zip(plain_us, tree_us, strict=True)), 2)
        out["tree_append_us_per_line"] = round(_append_only(d / "append.tlog", n), 2)
        m = 6_400
        signed = _writes(d / "signed.log", m, Checkpointer(key, cfg, metrics), True)
        out["checkpoints_per_second_at_full_speed"] = round((m // GROUP) / signed, 1)
        out["lines_per_second_with_a_checkpoint_every_group"] = round(m / signed)

        big = d / "big.log"
        t0 = time.perf_counter()
        _writes(big, lines, Checkpointer(key, cfg, metrics), False)
        out["write_seconds_for_the_big_log"] = round(time.perf_counter() - t0, 1)
        out["lines"] = lines
        for label, extra in (("startup_seconds", 0), ("startup_seconds_10k_unchecked", 10_000)):
            if extra:  # lines written after the last checkpoint (a crash before it)
                log = AuditLog(big)
                records = [_record(i) for i in range(GROUP)]
                for _ in range(extra // GROUP):
                    log.write_many(records)
                log.close()
            cp = Checkpointer(key, cfg, metrics)
            t0 = time.perf_counter()
            log = AuditLog(big, tree=cp)
            out[label] = round(time.perf_counter() - t0, 3)
            cp.start(log)
            cp.stop()
            log.close()
        service.close()
    return out


def main() -> None:
    """Run the benchmark and print (or write) its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.lines)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
