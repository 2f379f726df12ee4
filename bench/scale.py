"""Keys at scale (issue 24 §2): what a token of N keys costs the daemon.

    python -m bench.scale [--keys 10,1000,5000,10000] [--rounds 2] [--workers 1]
        [--creates 20] [--signs 100] [--out bench/results/scale-latest.json]

For each N, in each of ``--rounds`` rounds (the sizes alternate, so drift on
a shared machine hits them all), on a fresh copy of a cached token of N
ecdsa-p256 keys of purpose raw (bench/_fill.py; built once, the first time),
it measures:

- ``c_initialize_s``: SoftHSM's own ``C_Initialize`` alone, in a fresh
  process (the module reads its object store), before and after the daemon;
- ``ready_s``: ``signerd serve`` (``--workers``, mutual TLS, audit log on
  unless ``--no-audit``) from spawn to its ready file, i.e. serving;
- ``listing_s``: the daemon's own first listing of the keys (its "keys
  listed" log line), which runs in the background from just before ready;
- ``first_sign_at_ready_ms``: one Sign sent as soon as the ready file
  appears (it waits for the listing when the key is not indexed yet);
- ``list_rpc_s``: every key through ListKeys (pages of 1,000) right after;
- ``first_sign_new_ms``: the first Sign ever of each of ``--signs`` keys
  (spread over the token; each also marks its key used on the token), one
  after another: p50, p99, max;
- then the daemon is restarted and ``first_sign_ms`` is the first Sign after
  the restart of each of the same keys (now used, so nothing is written),
  once its listing is done, and ``sign_again_ms`` the second Sign of each
  (what any signature costs on this machine, to hold the first against);
- ``create_ms``: ``--creates`` CreateKey calls one after another, in the
  restarted daemon (where no superseded metadata waits to be destroyed):
  p50, p99;
- ``rss_mib``: the daemon's RSS (sum over its processes) at the end of the
  first life.

Targets (issue 24): at 10,000 keys, CreateKey p50 within 1.5x its cost at
10 keys; first Sign of any key after a restart within 5 ms; with one worker,
ready within C_Initialize + 0.5 s and the full listing within 10 s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import _fill
from bench._proc import loadavg, memory_kib
from bench.run import (
    CACHE,
    LABEL,
    ROOT,
    Env,
    Settings,
    child,
    client_channel,
    cpu_available,
    log,
    start_daemon,
)


def c_initialize(module: str, conf: Path) -> dict[str, float]:
    """SoftHSM's C_Initialize alone (and C_Finalize), in this child process."""
    import os

    os.environ["SOFTHSM2_CONF"] = str(conf)
    from signerd.token import _p11

    t0 = time.monotonic()
    lib = _p11.load(module)
    took = time.monotonic() - t0
    rss = memory_kib(os.getpid()).get("VmRSS", 0) / 1024
    lib.close()
    return {"seconds": round(took, 3), "rss_mib": round(rss, 1)}


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def _listing_seconds(stderr: Path) -> float | None:
    """The "keys listed" seconds the daemon logged last (JSON log lines)."""
    found = None
    for line in stderr.read_text(errors="replace").splitlines():
        if '"keys listed"' in line:
            m = re.search(r'"seconds":([0-9.]+)', line)
            found = float(m.group(1)) if m else found
    return found


def _times(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": _ms(values, 0.5), "p99": _ms(values, 0.99),
            "max": _ms(values, 1.0)}


def _life(env: Env, config: Path, sample: list[str], creates: int,
          first: bool) -> dict[str, Any]:
    """One daemon life on the token: see the module's doc. ``first``: the
    keys in ``sample`` were never used (the first life); else they were."""
    from signerd.v1 import signer_pb2 as pb
    from signerd.v1 import signer_pb2_grpc as pb_grpc

    out: dict[str, Any] = {}
    daemon = start_daemon(config, log_level="info")
    try:
        with client_channel(env.target(daemon.info["tcp"])) as ch:
            stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
            message = bytes(512)
            t0 = time.monotonic()
            stub.Sign(pb.SignRequest(key_id=sample[0], message=message), timeout=120)
            out["first_sign_at_ready_ms"] = round((time.monotonic() - t0) * 1000, 2)
            t0 = time.monotonic()
            listed, page = 0, ""
            while True:
                answer = stub.ListKeys(pb.ListKeysRequest(page_size=1000, page_token=page),
                                       timeout=120)
                listed += len(answer.keys)
                page = answer.next_page_token
                if not page:
                    break
            out["list_rpc_s"] = round(time.monotonic() - t0, 3)
            out["listed_keys"] = listed
            took = []
            for kid in sample[1:]:
                t0 = time.monotonic()
                stub.Sign(pb.SignRequest(key_id=kid, message=message), timeout=60)
                took.append(time.monotonic() - t0)
            out["first_sign_new_ms" if first else "first_sign_ms"] = _times(took)
            if not first:  # the same keys again: what any signature costs here, for scale
                took = []
                for kid in sample[1:]:
                    t0 = time.monotonic()
                    stub.Sign(pb.SignRequest(key_id=kid, message=message), timeout=60)
                    took.append(time.monotonic() - t0)
                out["sign_again_ms"] = _times(took)
            took = []
            for i in range(creates):
                t0 = time.monotonic()
                stub.CreateKey(pb.CreateKeyRequest(
                    gun=f"bench.example/scale/new{i}", role="targets", algorithm="ecdsa-p256",
                    purpose=pb.KEY_PURPOSE_RAW), timeout=60)
                took.append(time.monotonic() - t0)
            if took:
                out["create_ms"] = _times(took)
        out.update(daemon.memory_mib())
    finally:
        stopped = daemon.stop()
    out["ready_s"] = round(daemon.start_seconds, 3)
    out["listing_s"] = _listing_seconds(daemon.stderr)
    out["exit_code"] = stopped["exit_code"]
    return out


def point(env: Env, module: str, count: int, cache: Path, s: Settings, creates: int,
          signs: int, work: Path) -> dict[str, Any]:
    """One measurement of a token of ``count`` keys (see the module's doc):
    C_Initialize alone, a daemon that signs ``signs`` keys never used,
    C_Initialize again, then the daemon restarted, signing the same keys
    (now used) after its listing and making ``creates`` keys."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hsm, info = _fill.cached_token(module, cache, count, work / "hsm")
    sample: list[str] = info["sample"][:signs + 1]
    shutil.rmtree(env.dir / f"scale-{count}", ignore_errors=True)  # an earlier round's audit log
    config = env.write_config(f"scale-{count}", hsm, s)
    inits = [child(c_initialize, module, hsm.conf)]
    # CreateKey is timed in the second life, where no first signature has left
    # superseded metadata to destroy (signerd.token._retire): a destroy holds the
    # token for 0.4 s at 10,000 keys, and a CreateKey meeting one waits for it.
    first = _life(env, config, sample, 0, True)
    inits.append(child(c_initialize, module, hsm.conf))
    again = _life(env, config, sample, creates, False)
    c_init = [i["seconds"] for i in inits]
    out: dict[str, Any] = {
        "keys": count, "workers": s.workers, "audit": s.audit,
        "c_initialize_s": c_init, "c_initialize_rss_mib": inits[-1]["rss_mib"],
        "ready_s": [first["ready_s"], again["ready_s"]],
        "ready_minus_c_initialize_s": [round(first["ready_s"] - c_init[0], 3),
                                       round(again["ready_s"] - c_init[1], 3)],
        "listing_s": [first["listing_s"], again["listing_s"]],
        "first": first, "restart": again}
    shutil.rmtree(work, ignore_errors=True)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values)} if values else {}


def summary(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per N: the median of each figure over rounds (and over both daemon
    lives, for start figures), with its range."""
    rows = []
    for n in sorted({p["keys"] for p in points}):
        mine = [p for p in points if p["keys"] == n]

        def one(get: Any, mine: list[dict[str, Any]] = mine) -> dict[str, float]:
            return _spread([get(p) for p in mine])

        def both(name: str, mine: list[dict[str, Any]] = mine) -> dict[str, float]:
            return _spread([v for p in mine for v in p[name] if v is not None])

        rows.append({
            "keys": n, "rounds": len(mine),
            "create_p50_ms": one(lambda p: p["restart"]["create_ms"]["p50"]),
            "create_p99_ms": one(lambda p: p["restart"]["create_ms"]["p99"]),
            "first_sign_new_p50_ms": one(lambda p: p["first"]["first_sign_new_ms"]["p50"]),
            "first_sign_new_p99_ms": one(lambda p: p["first"]["first_sign_new_ms"]["p99"]),
            "first_sign_p50_ms": one(lambda p: p["restart"]["first_sign_ms"]["p50"]),
            "first_sign_p99_ms": one(lambda p: p["restart"]["first_sign_ms"]["p99"]),
            "sign_again_p50_ms": one(lambda p: p["restart"]["sign_again_ms"]["p50"]),
            "sign_again_p99_ms": one(lambda p: p["restart"]["sign_again_ms"]["p99"]),
            "first_sign_at_ready_ms": one(lambda p: p["restart"]["first_sign_at_ready_ms"]),
            "c_initialize_s": both("c_initialize_s"),
            "ready_s": both("ready_s"),
            "ready_minus_c_initialize_s": both("ready_minus_c_initialize_s"),
            # A first start of an audit directory chooses the checkpoint key from the
            # first listing; a restart builds it from its record: apart, they differ.
            "ready_minus_c_initialize_first_s": one(
                lambda p: p["ready_minus_c_initialize_s"][0]),
            "ready_minus_c_initialize_restart_s": one(
                lambda p: p["ready_minus_c_initialize_s"][1]),
            "listing_s": both("listing_s"),
            "list_rpc_s": one(lambda p: p["restart"]["list_rpc_s"]),
            "rss_mib": one(lambda p: p["first"]["rss_mib"]),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README's table: medians over rounds, (min-max) where they differ."""
    def f(d: dict[str, float], fmt: str) -> str:
        if not d:
            return "-"
        text = format(d["median"], fmt)
        if d["min"] != d["max"]:
            text += f" ({format(d['min'], fmt)}-{format(d['max'], fmt)})"
        return text

    lines = ["| keys | CreateKey p50 / p99 ms | first Sign after restart p50 / p99 ms "
             "| second Sign p50 / p99 ms | a key's first Sign ever p50 / p99 ms "
             "| Sign at ready ms | C_Initialize s | ready - C_Initialize s, restart "
             "| the same, first start | listing s | ListKeys s | RSS MiB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in rows:
        lines.append(
            f"| {r['keys']:,} | {f(r['create_p50_ms'], '.0f')} / {f(r['create_p99_ms'], '.0f')} "
            f"| {f(r['first_sign_p50_ms'], '.2f')} / {f(r['first_sign_p99_ms'], '.2f')} "
            f"| {f(r['sign_again_p50_ms'], '.2f')} / {f(r['sign_again_p99_ms'], '.2f')} "
            f"| {f(r['first_sign_new_p50_ms'], '.1f')} / {f(r['first_sign_new_p99_ms'], '.1f')} "
            f"| {f(r['first_sign_at_ready_ms'], '.0f')} "
            f"| {f(r['c_initialize_s'], '.2f')} "
            f"| {f(r['ready_minus_c_initialize_restart_s'], '.2f')} "
            f"| {f(r['ready_minus_c_initialize_first_s'], '.2f')} "
            f"| {f(r['listing_s'], '.2f')} | {f(r['list_rpc_s'], '.2f')} "
            f"| {f(r['rss_mib'], '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", default="10,1000,5000,10000", help="token sizes")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every size")
    p.add_argument("--workers", type=int, default=1, help="[server] workers")
    p.add_argument("--no-audit", action="store_true",
                   help="no [audit] table (no checkpoint key: at a first start it is chosen "
                        "with a full listing before the daemon serves)")
    p.add_argument("--creates", type=int, default=20, help="CreateKey calls per point")
    p.add_argument("--signs", type=int, default=100, help="keys signed once per point")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/scale-latest.json")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.keys.split(",") if x]
    s = replace(Settings(), workers=a.workers, cpu_affinity="none", audit=not a.no_audit)
    load_before, cpu_before = loadavg(), cpu_available()
    started = datetime.now(UTC)
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="signerd-bench-scale-") as tmp:
        env = Env.create(Path(tmp))
        for n in sizes:  # build what the cache lacks before measuring anything
            _fill.cached_token(env.module, a.cache, n, Path(tmp) / "probe")
            shutil.rmtree(Path(tmp) / "probe")
        for r in range(a.rounds):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                pt = point(env, env.module, n, a.cache, s, a.creates, a.signs,
                           Path(tmp) / "point")
                pt["round"] = r
                log(f"scale: {json.dumps(pt)}")
                points.append(pt)
    rows = summary(points)
    doc = {"when": started.isoformat(timespec="seconds"), "label": LABEL,
           "machine": {"load_before": load_before, "cpu_available_before": cpu_before,
                       "load_after": loadavg()},
           "settings": {"workers": a.workers, "rounds": a.rounds, "creates": a.creates,
                        "signs": a.signs, "threads": s.threads, "sessions": s.sessions,
                        "audit": s.audit},
           "summary": rows, "points": points}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(rows))
    log(f"results written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
