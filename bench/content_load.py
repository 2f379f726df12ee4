"""Notary Sign at 16 callers with the content checks off, on with SQLite, and on with
PostgreSQL, measured in alternation (issue 23's second benchmark).

    python -m bench.content_load [--rounds 5] [--duration 4] [--callers 16]
                                 [--json bench/results/content-load-latest.json]
                                 [--against /tmp/before]

About 100 s with the defaults, 40 s of it starting PostgreSQL, tokens and daemons. Three
signerd daemons, each started as users run it (``signerd serve``, mutual TLS, policy,
audit log, ``workers = 2``, ``threads = 8``, ``cpu_affinity = "spread"``: bench.run's
defaults) on its own fresh SoftHSM token:

``off``         ``[content] enabled = false`` (the documented switch): a metadata key
                signs any payload; nothing is parsed or recorded;
``sqlite``      the checks on (the defaults), watermarks in the embedded SQLite file
                (WAL, synchronous FULL), shared by the daemon's two worker processes;
``postgresql``  the checks on, ``[state] url`` a fresh PostgreSQL (tests/_postgres.py)
                with fsync on, as in production.

Each caller has a GUN of its own (``bench.example/notary/cN``) and its own P-256
timestamp key made through Notary's ``CreateKey``, and signs Notary timestamps as
notary-server does: canonical JSON (Notary's rules), ``expires`` 14 days ahead (notary's
default), ``meta.snapshot`` naming a new snapshot hash each time, and the version one
higher than its last, continuing across rounds. So each signature with the checks on is a
check against the recorded state, then a compare-and-set that raises the GUN's watermark
and records the hash of the file made (the freeze check's map), one transaction. Callers
never share a GUN, so PostgreSQL's row locks never make them wait for each other; SQLite's
write lock is one per file.

``--against TREE`` adds two variants, ``sqlite@before`` and ``postgresql@before``: the same
as ``sqlite`` and ``postgresql`` but running the signerd of another checkout (``mkdir
/tmp/before && git archive COMMIT | tar -x -C /tmp/before``), in the same alternation, to
compare two versions of the code under the same load of the shared machine.

The variants are measured in alternation (A B C A B C ...), each point ``duration``
seconds after 0.5 s of warm-up, so slow minutes on a shared machine hit all three alike.
The callers are closed loops on raw HTTP/2 (bench/_h2load.py), one connection each, from
this process. Reported per variant: the median over rounds of signatures/s, p50 and p99,
their spread (min-max over rounds), and the daemon's CPU per signature. Any refused or
failed call stops the run: every request is one the checks must sign.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/content_load.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _h2load  # noqa: E402
from bench._loadgen import NOTARY_SIGN, Target  # noqa: E402
from bench.run import (  # noqa: E402
    ROOT,
    Daemon,
    Env,
    Hsm,
    Settings,
    client_channel,
    log,
    quantile,
    start_daemon,
)

VARIANTS = ("off", "sqlite", "postgresql")
BEFORE = "@before"  # the suffix of a variant running the --against checkout
WARMUP = 0.5  # seconds before each window opens
EXPIRY = timedelta(days=14)  # notary-server's default timestamp expiry (notary's const.go)


@dataclass
class Caller:
    """One caller: its GUN, its timestamp key, and the last version it sent."""

    gun: str
    key_id: str
    version: int = 0

    def next_request(self) -> bytes:
        """The serialised Notary SignatureRequest for the next timestamp version."""
        from signerd.notary import signer_pb2 as npb

        self.version += 1
        return npb.SignatureRequest(keyID=npb.KeyID(ID=self.key_id),
                                    content=timestamp(self.gun, self.version)).SerializeToString()


def timestamp(gun: str, version: int) -> bytes:
    """Notary's canonical JSON of a timestamp ``signed`` object at ``version``, as
    notary-server makes it (about 200 bytes)."""
    from signerd.canonicaljson import encode_canonical

    snapshot = hashlib.sha256(f"{gun} snapshot {version}".encode()).digest()
    expires = (datetime.now(UTC) + EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
    return encode_canonical({
        "_type": "Timestamp", "expires": expires, "version": version,
        "meta": {"snapshot": {"length": 688,
                              "hashes": {"sha256": base64.b64encode(snapshot).decode()}}},
    })


@dataclass
class Variant:
    """One daemon under test and its callers (each keeps its version across rounds)."""

    name: str
    daemon: Daemon
    target: Target
    callers: list[Caller]
    conns: list[_h2load.Connection] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)

    def connect(self) -> None:
        """One raw HTTP/2 connection per caller, opened before any clock starts."""
        host, port = self.target.address.rsplit(":", 1)
        ctx = _h2load.context(str(self.target.ca), str(self.target.cert), str(self.target.key))
        self.conns = [_h2load.Connection(host, int(port), self.target.server_name, ctx)
                      for _ in self.callers]

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.daemon.stop()


def config_tail(name: str, pg_url: str) -> str:
    """The ``[content]``/``[state]`` tables variant ``name`` adds to bench.run's config."""
    name = name.removesuffix(BEFORE)
    if name == "off":
        return "\n[content]\nenabled = false\n"
    if name == "postgresql":
        return f'\n[state]\nurl = "{pg_url}"\n'
    return ""  # sqlite: the default, signerd-state.db next to the config


def make_callers(target: Target, variant: str, count: int) -> list[Caller]:
    """``count`` callers, each with a new P-256 timestamp key of its own GUN, made
    through Notary's CreateKey (a metadata key, as notary-server gets)."""
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    callers = []
    with client_channel(target) as ch:
        stub = npb_grpc.KeyManagementStub(ch)  # type: ignore[no-untyped-call]
        for i in range(count):
            gun = f"bench.example/notary/{variant}/c{i}"
            key = stub.CreateKey(npb.CreateKeyRequest(algorithm="ecdsa", gun=gun,
                                                      role="timestamp"))
            callers.append(Caller(gun, key.keyInfo.keyID.ID))
    return callers


def check_one(v: Variant) -> None:
    """Sign the first caller's next version over grpcio and verify the signature with
    the key's public key; raise RuntimeError if it is refused or does not verify."""
    import grpc

    from signerd import signing
    from signerd.keys import parse_algorithm
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    caller = v.callers[0]
    request = npb.SignatureRequest.FromString(caller.next_request())
    with client_channel(v.target) as ch:
        try:
            info = npb_grpc.KeyManagementStub(ch).GetKeyInfo(  # type: ignore[no-untyped-call]
                npb.KeyID(ID=caller.key_id), timeout=30)
            sig = npb_grpc.SignerStub(ch).Sign(request, timeout=30)  # type: ignore[no-untyped-call]
        except grpc.RpcError as e:
            raise RuntimeError(f"{v.name}: Notary Sign failed: {e.code().name}: "
                               f"{e.details()}") from None
    options = signing.SignOptions(signing.Encoding.RAW, prehashed=False)
    signing.verify(info.publicKey, parse_algorithm("ecdsa-p256"), sig.content,
                   request.content, options)


def measure(v: Variant, duration: float) -> dict[str, float]:
    """One point: every caller signs in a closed loop for ``duration`` seconds."""
    latencies: array[float] = array("d")
    counts = {"ok": 0, "errors": 0}
    measure_from = time.monotonic() + WARMUP
    end = measure_from + duration

    cpu: list[tuple[float, float]] = []  # (monotonic, daemon CPU s) as the window opens, closes

    def on_answer(t0: float, t1: float, body: bytes | None) -> None:
        if (not cpu and measure_from <= t1) or (len(cpu) == 1 and t1 > end):
            cpu.append((t1, v.daemon.cpu()))
        if measure_from <= t1 <= end:
            counts["ok" if body is not None else "errors"] += 1
            latencies.append(t1 - t0)
        elif body is None:
            counts["errors"] += 1

    _h2load.run_closed_loop_varying(
        v.conns, len(v.callers), _h2load.header_block(NOTARY_SIGN, v.target.server_name),
        lambda i: v.callers[i].next_request(), end, on_answer)
    if counts["errors"]:
        raise RuntimeError(f"{v.name}: {counts['errors']} calls failed or were refused "
                           f"(see {v.daemon.stderr} and the audit log beside it)")
    ops = counts["ok"] / duration
    (t_a, cpu_a), (t_b, cpu_b) = (cpu[0], cpu[-1]) if len(cpu) == 2 else ((0.0, 0.0),) * 2
    cores = (cpu_b - cpu_a) / (t_b - t_a) if t_b > t_a else 0.0
    return {"ops_per_s": round(ops, 1), "p50_ms": round(quantile(latencies, 0.50) * 1e3, 2),
            "p99_ms": round(quantile(latencies, 0.99) * 1e3, 2),
            "cpu_us_per_signature": round(cores / max(ops, 1e-9) * 1e6, 1)}


def summary(points: list[dict[str, float]]) -> dict[str, Any]:
    """Median and min-max over the rounds of each figure."""
    return {k: {"median": round(statistics.median(p[k] for p in points), 2),
                "min": min(p[k] for p in points), "max": max(p[k] for p in points)}
            for k in points[0]}


def run(rounds: int, duration: float, callers: int, s: Settings,
        against: Path | None = None) -> dict[str, Any]:
    """Start PostgreSQL and the daemons, measure them in alternation, stop all.
    ``against``: another checkout, whose signerd the ``@before`` variants run."""
    from tests import _postgres

    server = _postgres.start(fsync=True)
    variants: list[Variant] = []
    try:
        # ignore_cleanup_errors: a stopping daemon can still be writing in its directory.
        # The daemons stop (ExitStack) before their directory goes: a daemon whose token,
        # state and audit log were removed under it took seconds to exit.
        with tempfile.TemporaryDirectory(prefix="signerd-content-load-",
                                         ignore_cleanup_errors=True) as tmp, \
                ExitStack() as closing:
            env = Env.create(Path(tmp))
            names = [*VARIANTS] if against is None else [
                "off", "sqlite", f"sqlite{BEFORE}", "postgresql", f"postgresql{BEFORE}"]
            for name in names:
                label = name.replace("@", "-")
                hsm = Hsm.create(env.dir / f"hsm-{label}", env.module)
                config = env.write_config(label, hsm, s)
                config.write_text(config.read_text() + config_tail(name, server.url))
                tree = against if name.endswith(BEFORE) and against else ROOT
                daemon = start_daemon(config, tree=tree)
                target = env.target(daemon.info["tcp"])
                variant = Variant(name, daemon, target, [])
                variants.append(variant)
                closing.callback(variant.close)
                variant.callers = make_callers(target, label, callers)
                check_one(variant)
                variant.connect()
            for r in range(rounds):
                for v in variants:
                    v.rounds.append(measure(v, duration))
                    log(f"round {r + 1} {v.name}: {json.dumps(v.rounds[-1])}")
            return {"callers": callers, "rounds": rounds, "duration": duration,
                    "settings": {"workers": s.workers, "threads": s.threads,
                                 "cpu_affinity": s.cpu_affinity, "audit": s.audit},
                    "results": {v.name: {"rounds": v.rounds, **summary(v.rounds)}
                                for v in variants}}
    finally:
        server.stop()


def table(doc: dict[str, Any]) -> str:
    """The results as a Markdown table: median (min-max over rounds)."""
    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        f = r[key]
        return f"{f['median']:{fmt}} ({f['min']:{fmt}}–{f['max']:{fmt}})"

    names = {"off": "checks off", "sqlite": "checks, SQLite", "postgresql": "checks, PostgreSQL",
             f"sqlite{BEFORE}": "checks, SQLite, before",
             f"postgresql{BEFORE}": "checks, PostgreSQL, before"}
    lines = [f"Notary Sign, P-256 timestamps, {doc['callers']} callers (a GUN each); median "
             f"(min–max) of {doc['rounds']} alternating rounds of {doc['duration']:g} s",
             "",
             "| variant | signatures/s | p50 ms | p99 ms | daemon CPU µs/signature |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in doc["results"].items():
        lines.append(f"| {names[name]} | {cell(r, 'ops_per_s', ',.0f')} | "
                     f"{cell(r, 'p50_ms', '.2f')} | {cell(r, 'p99_ms', '.2f')} | "
                     f"{cell(r, 'cpu_us_per_signature', ',.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print the table and optionally write the JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.content_load",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--against", type=Path, metavar="TREE",
                   help="another signerd checkout: adds sqlite@before and postgresql@before")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.duration <= 0 or a.callers < 1:
        p.error("--rounds and --callers must be at least 1, --duration above 0")
    if a.against and not (a.against / "signerd" / "daemon").is_dir():
        p.error(f"--against: {a.against} is not a signerd checkout")
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = run(a.rounds, a.duration, a.callers, replace(Settings()),
              a.against.resolve() if a.against else None)
    if a.against:
        doc["against"] = str(a.against)
    doc["started"] = started
    print(table(doc))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
