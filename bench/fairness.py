"""How long a second identity waits while one identity floods the daemon.

``python -m bench.fairness [--engine threads|aio] [--threads 8] [--callers 64]
[--seconds 10] [--out bench/results/fairness-threads.json]``

Starts a real ``signerd serve`` (mutual TLS, audit log, one SoftHSM token
with ``threads`` sessions) in a temporary directory, then:

1. **idle**: the newcomer signs sequentially (ECDSA P-256) on the idle
   daemon, for its latency alone;
2. **flood**: the flooder, one identity with ``callers`` threads in a
   process of its own, keeps RSA-4096 signatures in flight (each holds a
   slot for a few milliseconds; it holds every slot it may and queues the
   rest) while the newcomer signs sequentially again.

Prints one JSON document: the newcomer's latency (p50, p99, max, in ms) idle
and during the flood, and the flood's signatures and status codes (no
error is expected: its surplus waits, it is never refused). The daemon's
rule (signerd.server._fair): the newcomer's request is admitted at once,
on the slot kept in reserve, so its latency during the flood is its own
service time plus the CPU it shares with the flood.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ADMIN = "spiffe://bench/flooder"
NEWCOMER = "spiffe://bench/newcomer"


def _setup(base: Path, engine: str, threads: int) -> Path:
    """Token, certificates, policy and config under ``base``; the config's path."""
    from signerd import embedded, pki

    module = embedded.softhsm_module()
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    pin = secrets.token_hex(8).encode()
    pki.write_private(base / "online.pin", pin)
    embedded.init_softhsm_token(module, conf, "bench-fair", pin, b"so-" + pin)
    ca = pki.make_ca("bench fairness CA")
    ca.write(base / "ca.pem", base / "ca-key.pem")
    pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)).write(
        base / "server.pem", base / "server-key.pem")
    for name, uri in (("flooder", ADMIN), ("newcomer", NEWCOMER)):
        pki.issue(ca, name, server=False, uris=(uri,)).write(
            base / f"{name}.pem", base / f"{name}-key.pem")
    (base / "policy.toml").write_text(
        f'[[rule]]\nidentities = ["{ADMIN}", "{NEWCOMER}"]\noperations = ["*"]\n')
    config = base / "signerd.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
threads = {threads}
engine = "{engine}"

[tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[policy]
file = "policy.toml"

[audit]
file = "audit.log"

[environment]
SOFTHSM2_CONF = "{conf}"

[[tokens]]
name = "online"
module = "{module}"
uri = "pkcs11:token=bench-fair"
pin_file = "online.pin"
roles = ["*"]
sessions = {threads}
""")
    return config


def _client(base: Path, port: int, who: str) -> Any:
    from signerd.client import Client, ClientConfig

    return Client(ClientConfig(f"127.0.0.1:{port}", base / "ca.pem", base / f"{who}.pem",
                               base / f"{who}-key.pem", "localhost", 60))


def _latencies(c: Any, key_id: str, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        c.sign(key_id, message=b"newcomer")
        out.append(time.perf_counter() - start)
    return out


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"n": len(times),
            "p50_ms": round(times[len(times) // 2] * 1000, 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
            "max_ms": round(times[-1] * 1000, 2)}


def _flood(base: str, port: int, key_id: str, callers: int, seconds: float,
           out: Any) -> None:
    """The flooder's process: ``callers`` threads signing for ``seconds``."""
    import grpc

    codes: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def caller() -> None:
        with _client(Path(base), port, "flooder") as c:
            while time.monotonic() < end:
                try:
                    c.sign(key_id, message=b"flood")
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(dict(codes))


def run(engine: str, threads: int, callers: int, seconds: float) -> dict[str, Any]:
    """Set up, measure and tear down; the results as a JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="signerd-fairness-") as tmp:
        base = Path(tmp)
        config = _setup(base, engine, threads)
        ready = base / "ready.json"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "signerd.daemon", "serve", "--ready-file", str(ready),
             "--config", str(config)], stdout=subprocess.DEVNULL,
            stderr=(base / "signerd.log").open("wb"), env=dict(os.environ))
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"signerd did not start: {(base / 'signerd.log').read_text()}")
                time.sleep(0.05)
            port = json.loads(ready.read_text())["tcp"]
            with _client(base, port, "flooder") as c:
                heavy = c.create_key("docker.io/bench/flood", "targets", "rsa-4096",
                                     purpose="raw").key_id
            with _client(base, port, "newcomer") as c:
                light = c.create_key("docker.io/bench/newcomer", "targets", purpose="raw").key_id
                idle = _latencies(c, light, min(seconds, 3.0))
                ctx = multiprocessing.get_context("spawn")
                out = ctx.Queue()
                flood = ctx.Process(target=_flood, args=(str(base), port, heavy, callers,
                                                         seconds + 2, out))
                flood.start()
                time.sleep(2)  # the flood fills its slots and its queue
                loaded = _latencies(c, light, seconds)
                codes = out.get(timeout=seconds + 120)
                flood.join()
        finally:
            daemon.terminate()
            daemon.wait(30)
    return {"engine": engine, "threads": threads, "flood_callers": callers,
            "seconds": seconds, "newcomer_idle": _summary(idle),
            "newcomer_during_flood": _summary(loaded), "flood_codes": codes,
            "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0]}


def main() -> None:
    """Parse argv, run, print (and with --out, write) the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("threads", "aio"), default="threads")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    result = run(a.engine, a.threads, a.callers, a.seconds)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
