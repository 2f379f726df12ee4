"""Interleaved A/B of daemon settings: which of two configurations is faster?

    python -m bench.ab --variant cpu_affinity=none --variant cpu_affinity=spread
    python -m bench.ab --rpc batch --callers 4 --set workers=2 \\
        --variant cpu_affinity=none --variant cpu_affinity=spread

Separate runs of bench.run on a shared machine differ by 20% or more from
one minute to the next (the token's own rate too), which hides most effects
worth measuring. So this starts one signerd per variant, each on its own
fresh SoftHSM token with one key, and measures them in alternation (A, B, A,
B, ...) with the same load generator: slow minutes hit every variant alike.
It reports the median over the rounds of signatures/s, p50, the daemon's CPU
per signature and its context switches per request (every thread of every
daemon process, from /proc).

Settings a variant may change: workers, threads, cpu_affinity, sessions,
audit (true/false); and ``tree``, another checkout of signerd to run that
variant's daemon from, to measure a change against the code before it::

    git worktree add /tmp/before HEAD~1
    python -m bench.ab --rpc stream --callers 4 --variant tree=/tmp/before --variant tree=.

With ``--floor`` the variants are no-op servers (bench/_floor.py) instead of
signerd: ``mode`` is the gRPC stack (sync: grpcio's sync server; aio:
grpc.aio on uvloop), and workers, threads and cpu_affinity apply as to
signerd. ``--rpc v1`` drives their Sign, ``--rpc stream`` their SignStream::

    python -m bench.ab --floor --callers 16 \\
        --variant mode=sync,workers=1 --variant mode=aio,workers=1 \\
        --variant mode=sync,workers=2 --variant mode=aio,workers=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/ab.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _proc  # noqa: E402
from bench.run import (  # noqa: E402
    FLOOR_MODES,
    ROOT,
    Daemon,
    Env,
    Floor,
    Hsm,
    LoadGen,
    Settings,
    create_keys,
    log,
    payload,
    request_bytes,
    start_daemon,
)

TUNABLE = ("workers", "threads", "cpu_affinity", "engine", "sessions", "audit", "tree")
FLOOR_TUNABLE = ("mode", "workers", "threads", "cpu_affinity")  # with --floor


def context_switches(pids: list[int]) -> int:
    """Voluntary plus involuntary context switches of every thread of ``pids``."""
    return sum(int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
               for pid in pids for _, status in _proc.thread_statuses(pid))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``name=value`` for one of TUNABLE, with the value in the field's type."""
    name, sep, value = text.partition("=")
    if sep and name == "tree":  # another checkout's signerd
        pkg = Path(value) / "signerd"  # signerd/daemon/ since the 2026-12 layout; daemon.py before
        if not ((pkg / "daemon.py").is_file() or (pkg / "daemon" / "__main__.py").is_file()):
            raise argparse.ArgumentTypeError(f"tree: {value} is not a signerd checkout")
        return name, str(Path(value).resolve())
    if sep and name == "mode":  # the floor's gRPC stack (--floor only)
        if value not in FLOOR_MODES:
            raise argparse.ArgumentTypeError(f"mode is one of {FLOOR_MODES}, not {value!r}")
        return name, value
    if not sep or name not in TUNABLE:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME in {TUNABLE}: {text!r}")
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "bool":
        if value not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} is true or false, not {value!r}")
        return name, value == "true"
    if kind == "int":
        try:
            return name, int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} is a number, not {value!r}") from None
    return name, value


def measure(daemon: Daemon, env: Env, gen: LoadGen, key: str, rpc: str, callers: int,
            s: Settings) -> dict[str, float]:
    request, items = request_bytes(rpc, key, payload(s.payload_bytes), s.batch_size)
    before = context_switches(daemon.pids)
    point = gen.run(daemon, env.target(daemon.info["tcp"]), rpc, request, items, callers, s)
    switches = context_switches(daemon.pids) - before
    if point["errors"]:
        raise RuntimeError(f"{point['errors']} errors, first: {point['first_error']}")
    ops = point["ops_per_s"]
    return {"ops_per_s": ops, "p50_ms": point["p50_ms"], "p99_ms": point["p99_ms"],
            "cpu_us_per_signature": round(point["daemon_cpu_cores"] / ops * 1e6, 1),
            "switches_per_request": round(switches / max(point["requests"], 1), 1),
            "loadgen_cpu_cores": point["loadgen_cpu_cores"]}


def run(base: Settings, variants: list[dict[str, Any]], rpc: str, algorithm: str, callers: int,
        rounds: int, floor: bool = False) -> list[dict[str, Any]]:
    """Start one server per variant (signerd, or with ``floor`` the no-op
    server) and measure them in alternation; the median of each over the rounds."""
    with tempfile.TemporaryDirectory(prefix="signerd-ab-") as tmp:
        env = Env.create(Path(tmp))
        daemons: list[tuple[Daemon, str]] = []
        gen: LoadGen | None = None
        try:
            for i, v in enumerate(variants):
                if floor:
                    settings = {k: x for k, x in v.items() if k != "mode"}
                    daemons.append((Floor.start(env, replace(base, **settings),
                                                v.get("mode", "sync")), "0" * 64))
                    continue
                hsm = Hsm.create(env.dir / f"hsm{i}", env.module)
                settings = {k: x for k, x in v.items() if k != "tree"}
                daemon = start_daemon(env.write_config(f"v{i}", hsm, replace(base, **settings)),
                                      tree=Path(v.get("tree", ROOT)))
                daemons.append((daemon, create_keys(env.target(daemon.info["tcp"]),
                                                    (algorithm,), 1)[algorithm]))
            gen = LoadGen(base.loadgen_procs, base.loadgen_mode, base.channels_per_proc)
            points: list[list[dict[str, float]]] = [[] for _ in variants]
            for r in range(rounds):
                for i, (daemon, key) in enumerate(daemons):
                    points[i].append(measure(daemon, env, gen, key, rpc, callers, base))
                    log(f"round {r + 1} {variants[i]}: {json.dumps(points[i][-1])}")
        finally:
            if gen is not None:
                gen.close()
            for daemon, _ in daemons:
                daemon.stop()
    return [{"variant": v, "rounds": p,
             **{k: statistics.median(x[k] for x in p) for k in p[0]}}
            for v, p in zip(variants, points, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                   help="one configuration to compare (give two or more)")
    p.add_argument("--set", action="append", default=[], type=parse_assignment,
                   metavar="NAME=VALUE", help="a setting shared by every variant")
    p.add_argument("--rpc", choices=("v1", "notary", "batch", "stream"), default="v1")
    p.add_argument("--floor", action="store_true",
                   help="compare no-op servers (bench/_floor.py; variants may set mode=sync|aio)")
    p.add_argument("--algorithm", choices=("ecdsa-p256", "ed25519", "rsa-2048"),
                   default="ecdsa-p256")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    a = p.parse_args(argv)
    if len(a.variant) < 2:
        p.error("give at least two --variant")
    try:
        variants = [dict(parse_assignment(x) for x in v.split(",")) for v in a.variant]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    allowed = FLOOR_TUNABLE if a.floor else TUNABLE
    for v in variants:
        if set(v) - set(allowed):
            p.error(f"{', '.join(sorted(set(v) - set(allowed)))}: a variant may set only "
                    f"{', '.join(allowed)}" + ("" if a.floor else " (mode needs --floor)"))
    if a.floor and a.rpc not in ("v1", "stream"):
        p.error("a floor serves Sign (--rpc v1) and SignStream (--rpc stream)")
    base = replace(Settings(), duration=a.duration, **dict(a.set))
    results = run(base, variants, a.rpc, a.algorithm, a.callers, a.rounds, a.floor)
    what = "floor (no-op server)" if a.floor else a.algorithm
    print(f"{a.rpc} Sign, {what}, {a.callers} callers, {base.workers} worker(s) unless "
          f"the variant says otherwise; median of {a.rounds} alternating rounds of "
          f"{a.duration:g} s\n")
    print("| variant | signatures/s | p50 ms | p99 ms | daemon CPU µs/signature | "
          "context switches/request | loadgen CPU |\n| --- | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for r in results:
        name = ", ".join(f"{k}={v}" for k, v in r["variant"].items())
        print(f"| {name} | {r['ops_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['cpu_us_per_signature']:,.0f} | {r['switches_per_request']:.1f} | "
              f"{r['loadgen_cpu_cores']:.2f} |")
    if a.out is not None:
        a.out.write_text(json.dumps({"settings": asdict(base), "rpc": a.rpc, "floor": a.floor,
                                     "algorithm": a.algorithm, "callers": a.callers,
                                     "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
