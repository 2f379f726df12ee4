"""Hostile connections: how many the daemon survives while another identity signs.

    python -m bench.hostile                         # every scenario, about 3 minutes
    python -m bench.hostile --scenario metrics --connections 1000,4000
    python -m bench.hostile --nofile 1024:524288    # the limits of a default systemd service
    python -m bench.hostile --tree /tmp/signerd-old # another checkout's signerd, for a before
    # deploy/nftables/signerd.nft in front, in a network namespace of its own:
    unshare -rn sh -c 'ip link set lo up && nft -f deploy/nftables/signerd.nft &&
      python -m bench.hostile --scenario tls --hostile-source 127.0.0.2 \
        --set server.listen=127.0.0.1:4443'

Loopback only, bounded in count (``--connections``, at most 8,000 per
point) and time (``--seconds`` per point, at most 60). What one point does:

1. start ``signerd serve`` (one process, mTLS on 127.0.0.1:0, the Unix
   socket, [metrics] listen; ``--set`` changes its [server] or [metrics]
   settings) under ``prlimit`` when ``--nofile`` is given;
2. open N hostile connections, never authenticated, and hold them for the
   window, reopening each one the daemon closes (at most 2,000 reopens a
   second, so the bench cannot spin a core on refusals):
   ``metrics``: to the metrics port, a request line then one header byte
   every second (a slow client); ``tls``: to the mTLS port, silent (no
   ClientHello); ``relay``: to the daemon's internal relay listener if it
   has a TCP one (before "Hardening, round 3": 127.0.0.1:<random>, found the
   way ``ss -ltnp`` finds it, from /proc/net/tcp), else to nothing: the
   point then records that there is no port to attack;
3. meanwhile, every 0.25 s, an authorised identity opens a fresh mTLS
   channel and signs (P-256, 512 bytes; 5 s deadline), and a fresh Unix
   socket channel does the same; /readyz is fetched too;
4. report per point: hostile connections actually held, Sign successes and
   p50/p99 latency over each transport, readyz answers, and the daemon's
   threads, open file descriptors and RSS at the end of the window.

"Survives N" means: with N held, every Sign of the window succeeded and its
p50 stayed within 3x the quiet p50 (the point with 0 hostile connections;
p99 of some 24 calls is their maximum, too noisy on a shared machine). The
attacker runs in the bench's own process and costs the machine CPU too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/hostile.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench import _proc  # noqa: E402
from bench._loadgen import SIGN  # noqa: E402
from bench.run import LABEL, ROOT, Env, Hsm, client_channel, create_keys, payload  # noqa: E402

SCENARIOS = ("metrics", "tls", "relay")
MAX_CONNECTIONS = 8000
MAX_SECONDS = 60.0
REOPENS_PER_SECOND = 2000
PROBE_EVERY = 0.25
PROBE_DEADLINE = 5.0


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def figures(self) -> dict[str, Any]:
        pid = self.proc.pid
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return {"alive": False}
        return {"alive": self.proc.poll() is None, "threads": threads, "fds": fds,
                "rss_mib": round(_proc.memory_kib(pid).get("VmRSS", 0) / 1024, 1)}


def write_config(env: Env, hsm: Hsm, work: Path, settings: dict[str, dict[str, Any]]) -> Path:
    """signerd.toml for one point: mTLS, the Unix socket and metrics, one process."""
    server = {"listen": "127.0.0.1:0", "unix_socket": str(work / "s.sock"), "threads": 8,
              **settings.get("server", {})}
    metrics = {"listen": "127.0.0.1:0", **settings.get("metrics", {})}

    def table(name: str, values: dict[str, Any]) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

    path = work / "signerd.toml"
    path.write_text(
        table("server", server) + table("metrics", metrics)
        + table("tls", {"cert": str(env.pki["server"]), "key": str(env.pki["server-key"]),
                        "client_ca": str(env.pki["ca"])})
        + table("policy", {"file": str(env.dir / "policy.toml")})
        + table("audit", {"file": str(work / "audit.log")})
        + table("environment", {"SOFTHSM2_CONF": str(hsm.conf)})
        + "[[tokens]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {
            "name": "bench", "module": env.module, "uri": f"pkcs11:token={LABEL}",
            "pin_file": str(hsm.pin_file), "sessions": 4}.items()))
    return path


def start(config: Path, tree: Path, nofile: str | None) -> Daemon:
    ready = config.parent / f"ready-{secrets.token_hex(4)}.json"
    log = config.parent / "signerd.log"
    prefix = ["prlimit", f"--nofile={nofile}", "--"] if nofile else []
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "signerd.daemon", "serve", "--config", str(config),
         "--ready-file", str(ready), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"), cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)})
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"signerd did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return Daemon(proc, json.loads(ready.read_text()), log)


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on, as ``ss -ltnp`` finds them: its socket
    inodes (/proc/PID/fd) matched against /proc/net/tcp's LISTEN rows."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Hostile:
    """N connections to ``address``, held and reopened when closed, on one
    thread with a selector. ``slow``: send a request line at once, then one
    header byte per second per connection (never finishing the request)."""

    address: tuple[str, int]
    count: int
    slow: bool
    source: str = ""  # the address the connections come from ("": the kernel's choice)
    held: int = 0
    reopened: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, sel: selectors.DefaultSelector) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            if self.source:
                s.bind((self.source, 0))
            s.connect(self.address)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return
        sel.register(s, selectors.EVENT_READ, {"sent": False})

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for _ in range(self.count):
            self._open(sel)
        last_trickle = time.monotonic()
        budget, second = REOPENS_PER_SECOND, int(time.monotonic())
        while not self._stop.is_set():
            now = time.monotonic()
            if int(now) != second:
                budget, second = REOPENS_PER_SECOND, int(now)
            for key, _ in sel.select(0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the daemon: reopen, within the budget
                    sel.unregister(s)
                    s.close()
                    if budget > 0:
                        budget -= 1
                        self.reopened += 1
                        self._open(sel)
            if self.slow and now - last_trickle >= 1.0:
                last_trickle = now
                for key in list(sel.get_map().values()):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        s.send(b"X" if key.data["sent"] else b"GET /metrics HTTP/1.1\r\nX")
                        key.data["sent"] = True
                    except OSError:
                        pass  # not connected yet, or closed: the read side sees it
            self.held = len(sel.get_map())
            while len(sel.get_map()) < self.count and budget > 0:  # refused opens
                budget -= 1
                self._open(sel)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def probe(env: Env, daemon: Daemon, key_id: str, seconds: float) -> dict[str, Any]:
    """Signs over fresh mTLS and Unix socket channels, and /readyz, for
    ``seconds``; latency in milliseconds."""
    from signerd.v1 import signer_pb2 as pb

    request = pb.SignRequest(key_id=key_id, message=payload(512)).SerializeToString()
    results: dict[str, list[float | str]] = {"tcp": [], "unix": [], "readyz": []}
    target = env.target(daemon.info["tcp"])
    end = time.monotonic() + seconds

    def readyz() -> None:  # on its own thread: a full metrics listener holds it 2 s
        url = f"http://127.0.0.1:{daemon.info['metrics']}/readyz"
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    results["readyz"].append(float(r.status))
            except OSError as e:
                results["readyz"].append(type(e).__name__)
            time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - t0)))

    ready_thread = threading.Thread(target=readyz, daemon=True)
    ready_thread.start()
    while time.monotonic() < end:
        t0 = time.monotonic()
        for transport in ("tcp", "unix"):
            start_ = time.perf_counter()
            try:
                if transport == "tcp":
                    with client_channel(target) as ch:
                        ch.unary_unary(SIGN)(request, timeout=PROBE_DEADLINE)
                else:
                    with grpc.insecure_channel(f"unix:{daemon.info['unix']}") as ch:
                        ch.unary_unary(SIGN)(request, timeout=PROBE_DEADLINE)
                results[transport].append((time.perf_counter() - start_) * 1000)
            except grpc.RpcError as e:
                results[transport].append(e.code().name)
        time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - t0)))
    ready_thread.join()
    out: dict[str, Any] = {}
    for name, values in results.items():
        ok = sorted(v for v in values if isinstance(v, float))
        failed = [v for v in values if isinstance(v, str)]
        out[name] = {"ok": len(ok), "failed": len(failed),
                     "errors": sorted(set(failed))}
        if name != "readyz" and ok:
            out[name]["p50_ms"] = round(statistics.median(ok), 1)
            out[name]["p99_ms"] = round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1)
    return out


def point(env: Env, hsm: Hsm, scenario: str, count: int, a: argparse.Namespace,
          settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(dir=env.dir, prefix=f"{scenario}-{count}-"))
    daemon = start(write_config(env, hsm, work, settings), a.tree, a.nofile)
    try:
        target = env.target(daemon.info["tcp"])
        key_id = create_keys(target, ("ecdsa-p256",), 1)["ecdsa-p256"]
        address: tuple[str, int] | None = None
        if scenario == "metrics":
            address = ("127.0.0.1", daemon.info["metrics"])
        elif scenario == "tls":
            address = ("127.0.0.1", daemon.info["tcp"])
        else:
            internal = listening_tcp_ports(daemon.proc.pid) - {daemon.info["tcp"],
                                                                daemon.info["metrics"]}
            if internal:
                address = ("127.0.0.1", min(internal))
        hostile = (Hostile(address, count, slow=scenario == "metrics", source=a.hostile_source)
                   if address else None)
        if hostile is not None and count:
            hostile.start()
            time.sleep(min(3.0, a.seconds / 2))  # let them connect
        result = {"scenario": scenario, "connections": count, "settings": settings,
                  "nofile": a.nofile, "attack_port": address[1] if address else None,
                  **probe(env, daemon, key_id, a.seconds)}
        result["held"] = hostile.held if hostile else 0
        result["reopened"] = hostile.reopened if hostile else 0
        result["daemon"] = daemon.figures()
        if hostile is not None:
            hostile.stop()
        return result
    finally:
        daemon.stop()


def survives(quiet: dict[str, Any], p: dict[str, Any]) -> bool:
    for transport in ("tcp", "unix"):
        t, q = p[transport], quiet[transport]
        if t["failed"] or not t["ok"] or t["p50_ms"] > 3 * q["p50_ms"]:
            return False
    return bool(p["daemon"].get("alive"))


def parse_set(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value as JSON, else a string)."""
    name, _, raw = text.partition("=")
    section, _, key = name.partition(".")
    if section not in ("server", "metrics") or not key or not raw:
        raise argparse.ArgumentTypeError(f"--set wants server.KEY=VALUE or metrics.KEY=VALUE, "
                                         f"got {text!r}")
    try:
        return section, key, json.loads(raw)
    except json.JSONDecodeError:
        return section, key, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--connections", default="0,1000,4000",
                        help="hostile connection counts, comma-separated (0: the quiet baseline)")
    parser.add_argument("--seconds", type=float, default=8.0, help="window per point")
    parser.add_argument("--nofile", metavar="SOFT:HARD",
                        help="run the daemon under prlimit --nofile=SOFT:HARD")
    parser.add_argument("--set", type=parse_set, action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="a [server] or [metrics] setting")
    parser.add_argument("--hostile-source", default="", metavar="ADDRESS",
                        help="bind the hostile connections to this loopback address "
                        "(127.0.0.2: another source than the signing caller, for a "
                        "per-source bound such as deploy/nftables/signerd.nft)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose signerd runs (default: this one)")
    parser.add_argument("--out", type=Path, help="also write the points as JSON here")
    a = parser.parse_args()
    counts = [int(c) for c in a.connections.split(",")]
    if any(not 0 <= c <= MAX_CONNECTIONS for c in counts) or not 0 < a.seconds <= MAX_SECONDS:
        parser.error(f"connections 0-{MAX_CONNECTIONS}, seconds up to {MAX_SECONDS}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the attacker needs fds too
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings: dict[str, dict[str, Any]] = {}
    for section, key, value in a.set:
        settings.setdefault(section, {})[key] = value
    points = []
    with tempfile.TemporaryDirectory(prefix="signerd-hostile-") as tmp:
        base = Path(tmp)
        env = Env.create(base)
        with (base / "policy.toml").open("a") as policy:  # the Unix socket's caller
            policy.write(f'[[rule]]\nname = "local"\nidentities = ["uid:{os.getuid()}"]\n'
                         'operations = ["sign"]\nroles = ["*"]\n')
        hsm = Hsm.create(base / "hsm", env.module)
        for scenario in a.scenario or SCENARIOS:
            quiet: dict[str, Any] | None = None
            for count in counts:
                p = point(env, hsm, scenario, count, a, settings)
                quiet = quiet or (p if count == 0 else None)
                if quiet is not None:
                    p["survives"] = survives(quiet, p)
                points.append(p)
                print(json.dumps(p), flush=True)
    if a.out:
        a.out.write_text(json.dumps(points, indent=1) + "\n")
    print("\n| scenario | hostile | held | tcp Sign ok/failed p50/p99 ms | unix Sign ok/failed "
          "p50/p99 ms | readyz ok/failed | threads | fds | survives |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in points:
        def sign(t: dict[str, Any]) -> str:
            return f"{t['ok']}/{t['failed']} {t.get('p50_ms', '-')}/{t.get('p99_ms', '-')}"
        d = p["daemon"]
        print(f"| {p['scenario']} | {p['connections']} | {p['held']} | {sign(p['tcp'])} | "
              f"{sign(p['unix'])} | {p['readyz']['ok']}/{p['readyz']['failed']} | "
              f"{d.get('threads', '-')} | {d.get('fds', '-')} | {p.get('survives', '-')} |")


if __name__ == "__main__":
    main()
