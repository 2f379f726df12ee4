"""Token benchmarks: signing rates on the TPM, and how fast health follows a token.

    python -m bench.tokens [--seconds 5] [--out bench/results/tokens-latest.json]
    python -m bench.tokens --recovery [--rates 0,5,30,60] [--repeat 2]
        [--health-interval 5] [--tree PATH] [--out bench/results/recovery-latest.json]

For each token kind the test suite has (SoftHSM, SoftHSM under the yubihsm
profile, a TPM 2.0 through swtpm + tpm2-abrmd + tpm2-pkcs11), it starts
``signerd serve`` with mutual TLS, policy and audit log on and the default
``health_interval`` (5 s), then:

- signs P-256 over mTLS (v1 Sign, grpcio client threads) at 1 and 16
  callers, and measures the token's own in-process rate in the same run
  (signerd's ``Token.sign`` from 1 and 2 threads, in a separate process);
- takes the token away with no request in flight (SoftHSM: its directory is
  moved; TPM: the simulator and resource manager are stopped), and times
  how long health takes to turn NOT_SERVING, then, once the token is back,
  how long until health is SERVING and until a Sign succeeds.

Health is polled every 20 ms, so the times carry up to 20 ms of polling.

``--recovery`` times a token that comes back while clients keep asking
(issue 24 §3): a client signs on a fixed schedule (open loop, bench/_paced.py)
at each of ``--rates`` signs per second; the token is taken away, health
turns NOT_SERVING, one more probe interval passes, and the token comes back.
It reports the seconds from the return to the first signature (at rate 0:
health polled until SERVING, then one Sign), per run, and how long the
failing requests took meanwhile. Kinds: a SoftHSM token whose neighbour
token on the same module stays up (``softhsm-neighbour-up``) or goes away
with it (``softhsm-neighbour-down``), and the TPM simulator restarted
(``tpm``). ``--tree`` runs the signerd of another checkout (e.g. an older
commit, exported with ``git archive``) for a before/after comparison. The
goal: within 2 × ``health_interval`` at any rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import _token
from bench._paced import Paced
from bench.run import LABEL, SPAWN, Env, Hsm, child, client_channel, start_daemon
from signerd.v1 import signer_pb2 as pb
from signerd.v1 import signer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Kind:
    name: str
    token_toml: str  # the [[tokens]] table
    environment: dict[str, str]
    unplug: Callable[[], object]
    replug: Callable[[], object]
    stop: Callable[[], object]


def softhsm_kind(env: Env, base: Path, profile: str) -> Kind:
    hsm = Hsm.create(base, env.module)
    [where] = list((hsm.dir / "tokens").iterdir())
    away = base / "away"
    table = (f'[[tokens]]\nname = "dut"\nmodule = "{env.module}"\nuri = "pkcs11:token=bench"\n'
             f'pin_file = "{hsm.pin_file}"\nprofile = "{profile}"\n')
    return Kind(profile, table, {"SOFTHSM2_CONF": str(hsm.conf)},
                lambda: where.rename(away), lambda: away.rename(where), lambda: None)


def tpm_kind(base: Path) -> Kind:
    sys.path.insert(0, str(ROOT))
    from tests import _tpm

    tpm = _tpm.start(base)
    table = (f'[[tokens]]\nname = "dut"\nmodule = "{_tpm.MODULE}"\n'
             f'uri = "pkcs11:token={_tpm.LABEL}"\npin_file = "{tpm.pin_file}"\n')
    return Kind("tpm", table, tpm.env, tpm.unplug, tpm.replug, tpm.stop)


def neighbour_kind(env: Env, base: Path, neighbour_down: bool) -> Kind:
    """Two tokens on one SoftHSM module: ``dut`` (label bench), which goes
    away, and ``neighbour``, which stays up or goes away with it."""
    hsm = Hsm.create(base, env.module)
    [where] = list((hsm.dir / "tokens").iterdir())
    pin = hsm.pin_file.read_bytes()
    child(_token.init_token, env.module, hsm.conf, "neighbour", pin, b"so-" + pin)
    [other] = [d for d in (hsm.dir / "tokens").iterdir() if d != where]
    moves = [(where, base / "away")]
    if neighbour_down:
        moves.append((other, base / "away-neighbour"))
    table = "".join(
        f'[[tokens]]\nname = "{name}"\nmodule = "{env.module}"\nuri = "pkcs11:token={label}"\n'
        f'pin_file = "{hsm.pin_file}"\nroles = ["{role}"]\n\n'
        for name, label, role in (("dut", LABEL, "*"), ("neighbour", "neighbour", "root")))
    return Kind("softhsm-neighbour-" + ("down" if neighbour_down else "up"), table,
                {"SOFTHSM2_CONF": str(hsm.conf)},
                lambda: [a.rename(b) for a, b in moves], lambda: [b.rename(a) for a, b in moves],
                lambda: None)


def write_config(env: Env, kind: Kind, work: Path, health_interval: float = 5.0) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    environment = "".join(f'{k} = "{v}"\n' for k, v in kind.environment.items())
    path = work / "signerd.toml"
    path.write_text(f"""[server]
listen = "127.0.0.1:0"
threads = 16
health_interval = {health_interval}
# max_inflight_per_identity unset: the bench's one identity uses 14 of the 16
# threads (2 are the reserve for newcomers); its other callers wait their turn

[tls]
cert = "{env.pki['server']}"
key = "{env.pki['server-key']}"
client_ca = "{env.pki['ca']}"

[policy]
file = "{env.dir / 'policy.toml'}"

[audit]
file = "{work / 'audit.log'}"

[environment]
{environment}
{kind.token_toml}""")
    return path


def _rate(call: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls per second of ``call``, made back to back from ``threads`` threads
    for ``seconds``."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        while time.monotonic() < stop:
            call()
            counts[i] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.monotonic() - start)


def _sign_rate(channel: grpc.Channel, key_id: str, callers: int, seconds: float) -> float:
    stub = pb_grpc.SignerServiceStub(channel)  # type: ignore[no-untyped-call]
    request = pb.SignRequest(key_id=key_id, message=bytes(512))
    return _rate(lambda: stub.Sign(request, timeout=30), callers, seconds)


def _token_rate(toml_path: str, key_id: str, threads: int, seconds: float) -> float:
    """signerd's own Token.sign from ``threads`` threads, in this (child) process."""
    from signerd import signing
    from signerd.config import load_config
    from signerd.keys import KeyID
    from signerd.token import Token

    config = load_config(Path(toml_path))
    os.environ.update(config.environment)
    token = Token(config.tokens[0])
    try:
        entry = token.lookup(KeyID(key_id))
        assert entry is not None
        mechanism, data = signing.prepare(entry.algorithm, bytes(512), signing.SignOptions())
        return _rate(lambda: token.sign(entry.key_id, mechanism, data,
                                        entry.algorithm.signature_size), threads, seconds)
    finally:
        token.close()


def _wait(test: Callable[[], bool], limit: float = 60.0) -> float:
    start = time.monotonic()
    while not test():
        if time.monotonic() - start > limit:
            raise RuntimeError(f"not reached in {limit}s")
        time.sleep(0.02)
    return time.monotonic() - start


def measure(env: Env, kind: Kind, work: Path, seconds: float) -> dict[str, Any]:
    config = write_config(env, kind, work)
    daemon = start_daemon(config)
    result: dict[str, Any] = {"kind": kind.name, "health_interval_s": 5.0}
    try:
        target = env.target(daemon.info["tcp"])
        with client_channel(target) as ch:
            stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
            key = stub.CreateKey(pb.CreateKeyRequest(gun="docker.io/bench/tokens",
                                                     role="targets", algorithm="ecdsa-p256",
                                                     purpose=pb.KEY_PURPOSE_RAW))
            for callers in (1, 16):
                _sign_rate(ch, key.key_id, callers, 0.5)  # warm up
                result[f"p256_sign_per_s_{callers}_callers"] = round(
                    _sign_rate(ch, key.key_id, callers, seconds), 1)
            with ProcessPoolExecutor(max_workers=1, mp_context=SPAWN) as pool:
                for threads in (1, 2):
                    result[f"token_p256_per_s_{threads}_threads"] = round(pool.submit(
                        _token_rate, str(config), key.key_id, threads, seconds).result(), 1)
            health = health_pb2_grpc.HealthStub(ch)

            def status() -> int:
                return int(health.Check(health_pb2.HealthCheckRequest(service=""),
                                        timeout=5).status)

            def signs() -> bool:
                try:
                    stub.Sign(pb.SignRequest(key_id=key.key_id, message=b"m"), timeout=5)
                    return True
                except grpc.RpcError:
                    return False

            time.sleep(1)
            kind.unplug()
            result["not_serving_after_s"] = round(_wait(lambda: status() == NOT_SERVING), 3)
            time.sleep(1)
            kind.replug()
            back = time.monotonic()
            result["serving_after_s"] = round(_wait(lambda: status() == SERVING), 3)
            _wait(signs)
            result["signing_after_s"] = round(time.monotonic() - back, 3)
    finally:
        daemon.stop()
    return result


_RECOVERY_LIMIT = 60.0  # seconds after the return: "not recovered" past this


def _recovery_point(kind: Kind, stub: Any, health: Any, key_id: str, rate: float,
                    interval: float) -> dict[str, Any]:
    """One outage at ``rate`` signs per second: see the module's doc."""
    request = pb.SignRequest(key_id=key_id, message=b"recovery")

    def status() -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)

    def signs() -> bool:
        try:
            stub.Sign(request, timeout=5)
            return True
        except grpc.RpcError:
            return False

    point: dict[str, Any] = {"rate_per_s": rate}
    # Each caller thread keeps the schedule while a call takes < threads / rate.
    with Paced(lambda: stub.Sign(request, timeout=30), rate,
               threads=max(2, int(rate // 10) + 1)) as load:
        time.sleep(1)
        kind.unplug()
        away = time.monotonic()
        point["not_serving_after_s"] = round(_wait(lambda: status() == NOT_SERVING), 3)
        time.sleep(interval)  # another probe, and requests, meet the missing token
        kind.replug()
        back = time.monotonic()
        try:
            if rate:
                _wait(lambda: load.recovered_after(back) is not None, _RECOVERY_LIMIT)
                recovered = load.recovered_after(back)
            else:
                _wait(lambda: status() == SERVING, _RECOVERY_LIMIT)
                _wait(signs, _RECOVERY_LIMIT)
                recovered = time.monotonic() - back
            point["recovered_after_s"] = round(recovered or 0.0, 3)
        except RuntimeError:
            point["recovered_after_s"] = None  # not within the limit
            point["still_failing_after_s"] = _RECOVERY_LIMIT
    if point["recovered_after_s"] is None:  # the load has stopped: does it come back now?
        stopped = time.monotonic()
        try:
            _wait(signs, _RECOVERY_LIMIT)
            point["recovered_after_load_stopped_s"] = round(time.monotonic() - stopped, 3)
        except RuntimeError:
            point["recovered_after_load_stopped_s"] = None
    failed = load.failures_after(away)
    took = sorted(c.end - c.start for c in failed)
    point.update(failed_requests=len(failed),
                 failed_request_p50_ms=round(took[len(took) // 2] * 1000, 1) if took else None,
                 failed_request_max_ms=round(took[-1] * 1000, 1) if took else None,
                 schedule_lag_max_s=round(load.lag, 3))
    return point


def measure_recovery(env: Env, kind: Kind, work: Path, rates: list[float], repeat: int,
                     interval: float, tree: Path) -> dict[str, Any]:
    """Every rate, ``repeat`` times, on one daemon."""
    config = write_config(env, kind, work, interval)
    daemon = start_daemon(config, tree=tree)
    result: dict[str, Any] = {"kind": kind.name, "health_interval_s": interval,
                              "goal_s": 2 * interval, "tree": str(tree), "points": []}
    try:
        with client_channel(env.target(daemon.info["tcp"])) as ch:
            stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
            health = health_pb2_grpc.HealthStub(ch)
            key = stub.CreateKey(pb.CreateKeyRequest(gun="docker.io/bench/recovery",
                                                     role="targets", algorithm="ecdsa-p256",
                                                     purpose=pb.KEY_PURPOSE_RAW))
            for rate in rates:
                for _ in range(repeat):
                    point = _recovery_point(kind, stub, health, key.key_id, rate, interval)
                    print(json.dumps({"kind": kind.name, **point}), flush=True)
                    result["points"].append(point)
    finally:
        daemon.stop()
    return result


def recovery_main(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    env = Env.create(base)
    results = []
    rates = [float(r) for r in args.rates.split(",")]
    for name in args.kinds.split(","):
        if name == "tpm":
            kind = tpm_kind(base / name)
        elif name.startswith("softhsm-neighbour-"):
            kind = neighbour_kind(env, base / name, name.endswith("down"))
        else:
            raise SystemExit(f"--recovery: unknown kind {name}")
        try:
            results.append(measure_recovery(env, kind, base / name / "work", rates, args.repeat,
                                            args.health_interval, args.tree))
        finally:
            kind.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate point")
    parser.add_argument("--kinds", default=None, help="default: softhsm,yubihsm,tpm; with "
                        "--recovery: softhsm-neighbour-up,softhsm-neighbour-down,tpm")
    parser.add_argument("--recovery", action="store_true",
                        help="time a token that comes back under load (see above)")
    parser.add_argument("--rates", default="0,5,30,60", help="--recovery: signs per second")
    parser.add_argument("--repeat", type=int, default=2, help="--recovery: outages per rate")
    parser.add_argument("--health-interval", type=float, default=5.0,
                        help="--recovery: the daemon's server.health_interval (s)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="--recovery: the checkout whose signerd runs")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/"
                        "tokens-latest.json; with --recovery: recovery-latest.json")
    args = parser.parse_args(argv)
    if args.kinds is None:
        args.kinds = ("softhsm-neighbour-up,softhsm-neighbour-down,tpm" if args.recovery
                      else "softhsm,yubihsm,tpm")
    if args.out is None:
        args.out = ROOT / "bench/results" / (
            "recovery-latest.json" if args.recovery else "tokens-latest.json")
    base = Path(tempfile.mkdtemp(prefix="signerd-bench-tokens-"))
    results = []
    try:
        if args.recovery:
            results = recovery_main(args, base)
            doc = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
            return 0
        env = Env.create(base)
        for name in args.kinds.split(","):
            kind = tpm_kind(base / name) if name == "tpm" else \
                softhsm_kind(env, base / name, name)
            try:
                results.append(measure(env, kind, base / name / "work", args.seconds))
                print(json.dumps(results[-1]), flush=True)
            finally:
                kind.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
