"""signerd benchmark: throughput and latency over mTLS against SoftHSM.

    python -m bench.run                 # full run, about 6 minutes (the first time about 5 more:
                                        # it fills a token with 10,000 keys for bench/.cache/,
                                        # bench/_fill.py; bench/scale.py measures key counts)
    python -m bench.run --smoke         # under a minute; what tests/test_bench.py runs
    python -m bench.run --help          # pick algorithms, RPCs, callers, daemon settings

What one run does, all in a fresh temporary directory:

1. initialise a SoftHSM token, make a CA, a server and a client certificate
   (mutual TLS on, as users run signerd) and a policy for the client;
2. start ``signerd serve`` as a subprocess (by default ``workers = 2``,
   ``threads = 8``, ``cpu_affinity = "spread"``) and create one key per
   algorithm (P-256, Ed25519, RSA-2048) over the v1 API, plus P-256 filler
   keys up to 10;
3. in a separate process, measure the token's own rate (python-pkcs11
   ``key.sign`` with an explicit mechanism, one session per thread) and
   signerd's in-process signing path (``Token.sign``), one and two threads;
4. drive the daemon with 1, 4, 16 and 64 closed-loop callers over the
   signerd.v1 Sign RPC, the Notary-compatible ``/proto.Signer/Sign`` (when
   the daemon serves it) and SignBatch, with a 512-byte payload, and
   SignStream (when the daemon serves it) with 1 and 4 callers, each
   keeping one stream open with 32 requests outstanding; then the Go peer,
   stock notary-signer (when installed), on the same transport, its Sign
   driven like signerd's Notary Sign at 1 and 16 callers and each point
   followed by signerd's; then the same callers against a no-op gRPC server
   with the same transport (bench/_floor.py) on both Python gRPC stacks,
   grpcio's sync server and grpc.aio on uvloop, in alternation: the faster,
   the "best floor", is the most any Python gRPC signer can do here. The
   callers live in their own processes (bench/_loadgen.py) and by default
   speak raw HTTP/2 (bench/_h2load.py), which costs them far less CPU than
   grpcio's client. Each point
   reports signatures/s, p50 and p99 latency, the daemon's CPU
   (utime+stime from /proc, every worker) and RSS, the load generator's
   CPU, everything else the machine did meanwhile, and the rate as a ratio
   to the token's own rate;
5. the many-keys scenario: a token holding 10,000 keys (generated once and
   cached under bench/.cache/), measuring daemon start (spawn to ready
   file), latency and throughput against the small token in alternation,
   RSS and PSS, the same with one worker, and where the start time goes.

Results go to bench/results/latest.json (``--out``) and Markdown tables are
printed. CPU figures are in cores: 1.0 is one core busy for the window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from bench import _loadgen, _proc, _token  # noqa: E402
from bench._loadgen import Point, Target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
IDENTITY = "spiffe://bench/loadgen"
ALGORITHMS = ("ecdsa-p256", "ed25519", "rsa-2048")
RPCS = ("v1", "notary", "batch", "stream")
# The Go peer: stock notary-signer (Debian's `notary` package), software keys in memory.
NOTARY_SIGNER = "/usr/bin/notary-signer"
PEER_GUN = "bench.example/peer"
FLOOR_MODES = ("sync", "aio")  # bench/_floor.py: grpcio's sync server, grpc.aio on uvloop
LABEL = "bench"
SPAWN = multiprocessing.get_context("spawn")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log_point(head: str, point: dict[str, Any], server: str = "server") -> None:
    """Log one measured point: its errors if it had any, then ``head`` with its
    rate, p50, p99 and the CPU of the server (named ``server``) and loadgen."""
    if point["errors"]:
        log(f"  {point['errors']} errors, first: {point['first_error']}")
    log(f"{head}: {point['ops_per_s']:9.1f}/s "
        f"p50 {point['p50_ms']:.3f} ms p99 {point['p99_ms']:.3f} ms "
        f"{server} {point['daemon_cpu_cores']:.2f} loadgen "
        f"{point['loadgen_cpu_cores']:.2f} cores")


@dataclass(frozen=True)
class Settings:
    algorithms: tuple[str, ...] = ALGORITHMS
    rpcs: tuple[str, ...] = RPCS
    callers: tuple[int, ...] = (1, 4, 16, 64)
    duration: float = 3.0  # seconds measured per point
    warmup: float = 0.5  # seconds run before the window opens
    token_seconds: float = 2.0
    batch_size: int = 100
    payload_bytes: int = _token.PAYLOAD_BYTES
    small_keys: int = 10
    many_keys: int = 10_000
    # Daemon settings under test ([server] and [[tokens]] of signerd.toml).
    # Measured best on 2 cores (see the design notes in the final report):
    # two workers double throughput; 8 threads per worker beat 32 a little.
    workers: int = 2
    threads: int = 8
    # Each worker on its own CPU; bench/ab.py measured it against "none" (README, Performance).
    cpu_affinity: str = "spread"
    engine: str = "threads"  # [server] engine: the default; bench.ab measured "aio" (README)
    sessions: int = 4
    audit: bool = True
    # SignStream: callers, each with one stream and this many requests outstanding.
    stream_callers: tuple[int, ...] = (1, 4)
    stream_depth: int = _loadgen.STREAM_DEPTH
    floor: bool = True  # also measure a no-op gRPC server (bench/_floor.py)
    # Both Python gRPC stacks, measured in alternation; "best floor" is the faster.
    floor_modes: tuple[str, ...] = FLOOR_MODES
    # notary-signer on the same transport, driven like signerd's Notary Sign.
    peer: bool = True
    peer_callers: tuple[int, ...] = (1, 16)
    peer_rounds: int = 1  # alternations of notary-signer and signerd per caller count
    # Load generator.
    loadgen_procs: int = 2
    loadgen_mode: str = "h2"  # raw HTTP/2 (bench/_h2load.py); "threads"/"aio" use grpcio
    channels_per_proc: int = 8
    cache_dir: str = str(CACHE)  # where the many-keys token is kept between runs


# -- the environment: SoftHSM, certificates, policy, config -------------------


@dataclass
class Env:
    dir: Path
    module: str
    pki: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, base: Path) -> Env:
        from signerd import embedded, pki

        env = cls(base, embedded.softhsm_module())
        tls = base / "tls"
        tls.mkdir()
        ca = pki.make_ca("signerd bench CA")
        ca.write(tls / "ca.pem", tls / "ca-key.pem")
        pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)).write(
            tls / "server.pem", tls / "server-key.pem")
        pki.issue(ca, "loadgen", server=False, uris=(IDENTITY,)).write(
            tls / "client.pem", tls / "client-key.pem")
        env.pki = {name: tls / f"{name}.pem" for name in ("ca", "server", "server-key", "client",
                                                          "client-key")}
        (base / "policy.toml").write_text(
            f'[[rule]]\nname = "bench"\nidentities = ["{IDENTITY}"]\noperations = ["*"]\n'
            'roles = ["*"]\n')
        return env

    def target(self, port: int) -> Target:
        return Target(f"127.0.0.1:{port}", self.pki["ca"], self.pki["client"],
                      self.pki["client-key"])

    def write_config(self, name: str, hsm: Hsm, s: Settings) -> Path:
        work = self.dir / name
        work.mkdir(exist_ok=True)
        audit = f'[audit]\nfile = "{work / "audit.log"}"\n' if s.audit else ""
        path = work / "signerd.toml"
        path.write_text(f"""[server]
listen = "127.0.0.1:0"
threads = {s.threads}
# max_inflight_per_identity unset: the one identity uses every thread but the
# reserve, and its callers past that wait their turn (signerd.server._fair)
workers = {s.workers}
cpu_affinity = "{s.cpu_affinity}"
engine = "{s.engine}"

[tls]
cert = "{self.pki['server']}"
key = "{self.pki['server-key']}"
client_ca = "{self.pki['ca']}"

[policy]
file = "{self.dir / 'policy.toml'}"

{audit}
[environment]
SOFTHSM2_CONF = "{hsm.conf}"

[[tokens]]
name = "bench"
module = "{self.module}"
uri = "pkcs11:token={LABEL}"
pin_file = "{hsm.pin_file}"
sessions = {s.sessions}
""")
        return path


@dataclass(frozen=True)
class Hsm:
    """A SoftHSM configuration with one initialised token labelled ``bench``."""

    dir: Path
    module: str

    @property
    def conf(self) -> Path:
        return self.dir / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.dir / "user.pin"

    def write_conf(self) -> None:
        (self.dir / "tokens").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"directories.tokendir = {self.dir / 'tokens'}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n"
                             "slots.removable = false\n")

    @classmethod
    def create(cls, base: Path, module: str) -> Hsm:
        from signerd import pki

        hsm = cls(base, module)
        hsm.write_conf()
        pin = secrets.token_hex(8).encode()
        pki.write_private(hsm.pin_file, pin)
        child(_token.init_token, module, hsm.conf, LABEL, pin, b"so-" + pin)
        return hsm

    def copy_to(self, base: Path) -> Hsm:
        """The same token in another directory (SoftHSM's file store is a
        directory of object files; the config names it by absolute path)."""
        shutil.copytree(self.dir / "tokens", base / "tokens")
        shutil.copy2(self.pin_file, base / "user.pin")
        copy = Hsm(base, self.module)
        copy.write_conf()
        return copy


def child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh 'spawn' process and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=SPAWN) as pool:
        return pool.submit(fn, *args).result()


# -- the daemon -----------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    start_seconds: float
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The daemon's processes: itself, and its workers if it has them."""
        return [self.pid, *self.info.get("workers", [])]

    def cpu(self) -> float:
        return sum(_proc.cpu_seconds(p) for p in self.pids)

    def memory_mib(self) -> dict[str, float]:
        """Total VmRSS and VmHWM over the daemon's processes, in MiB."""
        mems = [_proc.memory_kib(p) for p in self.pids]
        return {"rss_mib": round(sum(m.get("VmRSS", 0) for m in mems) / 1024, 1),
                "hwm_mib": round(sum(m.get("VmHWM", 0) for m in mems) / 1024, 1),
                "pss_mib": round(sum(m.get("Pss", 0) for m in mems) / 1024, 1),
                "max_process_rss_mib": round(max(m.get("VmRSS", 0) for m in mems) / 1024, 1),
                "processes": len(mems)}

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return {"exit_code": code, "stop_seconds": round(time.monotonic() - t0, 3)}


def start_daemon(config: Path, timeout: float = 120, tree: Path = ROOT,
                 module: str = "signerd.daemon", env: dict[str, str] | None = None,
                 log_level: str = "warning") -> Daemon:
    """``signerd serve`` as users run it; time from spawn to ready file.
    ``tree``: the checkout whose signerd runs (bench.ab's ``tree`` variant);
    ``module`` and ``env``: another entry point and more environment (bench/_sqltrace.py);
    its log goes to ``signerd.log`` beside ``config``."""
    ready = config.parent / f"ready-{secrets.token_hex(4)}.json"
    stderr = config.parent / "signerd.log"
    cmd = [sys.executable, "-m", module, "serve", "--config", str(config),
           "--ready-file", str(ready), "--log-level", log_level]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr.open("ab"), cwd=tree,
                            env={**os.environ, **(env or {}), "PYTHONPATH": str(tree)})
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"signerd exited with {proc.returncode}:\n{stderr.read_text()[-4000:]}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"signerd did not start in {timeout}s")
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    return Daemon(proc, json.loads(ready.read_text()), elapsed, stderr)


class Floor(Daemon):
    """bench/_floor.py in ``workers`` processes sharing one port; ``mode`` is
    its gRPC stack: "sync" (grpcio's sync server) or "aio" (grpc.aio on uvloop)."""

    others: list[subprocess.Popen[bytes]]

    @classmethod
    def start(cls, env: Env, s: Settings, mode: str = "sync") -> Floor:
        """Start the workers one after the other (the first binds the port)."""
        procs: list[subprocess.Popen[bytes]] = []
        port = 0
        t0 = time.monotonic()
        for i in range(max(1, s.workers)):
            port_file = env.dir / f"floor-{mode}-{secrets.token_hex(4)}-{i}.port"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench._floor", "--tls", str(env.dir / "tls"),
                 "--mode", mode, "--threads", str(s.threads), "--port", str(port),
                 "--port-file", str(port_file),
                 *(["--cpu-index", str(i + 1)] if s.cpu_affinity == "spread" else [])],
                cwd=ROOT, stdout=subprocess.DEVNULL))
            while not port_file.exists():
                if procs[-1].poll() is not None:
                    raise RuntimeError("the floor server did not start")
                time.sleep(0.01)
            port = int(port_file.read_text())
        floor = cls(procs[0], {"tcp": port, "workers": [p.pid for p in procs[1:]]},
                    time.monotonic() - t0, env.dir / "floor.log")
        floor.others = procs[1:]
        return floor

    def stop(self) -> dict[str, Any]:
        for p in self.others:
            p.terminate()
        for p in self.others:
            p.wait(10)
        return super().stop()


class Peer(Daemon):
    """Stock notary-signer (Go) with software keys in memory storage, on the
    bench's mutual TLS: the same CA, server certificate and client certificate."""

    @classmethod
    def start(cls, env: Env, timeout: float = 30) -> Peer:
        """Start it on a free loopback port; ready once a TLS channel is."""
        work = env.dir / "peer"
        work.mkdir(exist_ok=True)
        stderr = work / "notary-signer.log"
        for _ in range(5):  # the port is picked before notary-signer binds it: retry a race
            port = _free_port()
            config = work / "signer-config.json"
            config.write_text(json.dumps({
                "server": {"grpc_addr": f"127.0.0.1:{port}",
                           "tls_cert_file": str(env.pki["server"]),
                           "tls_key_file": str(env.pki["server-key"]),
                           "client_ca_file": str(env.pki["ca"])},
                "logging": {"level": "error"},  # notary-signer logs every Sign at info
                # Keys in memory: no database, and no passphrase alias to set.
                "storage": {"backend": "memory"},
            }, indent=2))
            t0 = time.monotonic()
            proc = subprocess.Popen([NOTARY_SIGNER, "-config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=stderr.open("ab"), cwd=work)
            peer = cls(proc, {"tcp": port, "workers": []}, 0.0, stderr)
            # Listening first (a channel that fails to connect backs off for a second or more),
            # then a TLS channel ready: the handshake with the bench's client certificate works.
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.01)
            if proc.poll() is None:
                with client_channel(env.target(port)) as ch:
                    try:
                        grpc.channel_ready_future(ch).result(
                            timeout=max(1.0, timeout - (time.monotonic() - t0)))
                        peer.start_seconds = time.monotonic() - t0
                        return peer
                    except grpc.FutureTimeoutError:
                        pass
            peer.stop()
        raise RuntimeError(f"notary-signer did not start:\n{stderr.read_text()[-4000:]}")

    def create_key(self, target: Target) -> tuple[str, bytes]:
        """An ECDSA P-256 key through /proto.KeyManagement/CreateKey: its ID
        and public key (SubjectPublicKeyInfo DER)."""
        from signerd.notary import signer_pb2 as npb

        with client_channel(target) as ch:
            raw = unary(ch, "/proto.KeyManagement/CreateKey")(npb.CreateKeyRequest(
                algorithm="ecdsa", role="targets", gun=PEER_GUN).SerializeToString(), timeout=30)
        key = npb.PublicKey.FromString(raw)
        return key.keyInfo.keyID.ID, key.publicKey


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def client_channel(target: Target) -> Iterator[grpc.Channel]:
    creds = grpc.ssl_channel_credentials(target.ca.read_bytes(), target.key.read_bytes(),
                                         target.cert.read_bytes())
    ch = grpc.secure_channel(target.address, creds,
                             options=[("grpc.ssl_target_name_override", target.server_name)])
    try:
        yield ch
    finally:
        ch.close()


def unary(ch: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary call on raw bytes (no serialiser either way)."""
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(path)
    return call


def create_keys(target: Target, algorithms: tuple[str, ...], total: int) -> dict[str, str]:
    """One key per algorithm, and P-256 filler keys up to ``total`` keys."""
    from signerd.v1 import signer_pb2 as pb
    from signerd.v1 import signer_pb2_grpc as pb_grpc

    keys: dict[str, str] = {}
    with client_channel(target) as ch:
        stub = pb_grpc.SignerServiceStub(ch)  # type: ignore[no-untyped-call]
        for i, alg in enumerate(algorithms):
            # Raw keys: the bench signs opaque payloads, which a metadata key refuses
            # (content-aware signing, issue 23); bench.content measures the checks.
            keys[alg] = stub.CreateKey(pb.CreateKeyRequest(
                gun=f"bench.example/app{i}", role="targets", algorithm=alg,
                purpose=pb.KEY_PURPOSE_RAW)).key_id
        for i in range(total - len(algorithms)):
            stub.CreateKey(pb.CreateKeyRequest(gun=f"bench.example/filler{i}", role="targets",
                                               algorithm="ecdsa-p256",
                                               purpose=pb.KEY_PURPOSE_RAW))
    return keys


# -- requests, and one verified answer per (rpc, key) ------------------------------------


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def request_bytes(rpc: str, key_id: str, data: bytes, batch: int) -> tuple[bytes, int]:
    """The serialised request for ``rpc`` and how many signatures it asks for."""
    from signerd.notary import signer_pb2 as npb
    from signerd.v1 import signer_pb2 as pb

    if rpc in ("v1", "stream"):  # a stream sends SignRequest messages, one signature each
        return pb.SignRequest(key_id=key_id, message=data).SerializeToString(), 1
    if rpc == "notary":
        return npb.SignatureRequest(keyID=npb.KeyID(ID=key_id), content=data).SerializeToString(), 1
    one = pb.SignRequest(key_id=key_id, message=data)
    return pb.SignBatchRequest(requests=[one] * batch).SerializeToString(), batch


def check_answer(target: Target, rpc: str, key_id: str, algorithm: str, data: bytes,
                 spki: bytes | None = None) -> str | None:
    """Send one request and verify the signature; None if fine, else why not.

    The load generator leaves answers unparsed, so this is where a wrong
    signature (or an RPC that is not there yet) is caught. The public key
    comes from signerd's GetKey unless ``spki`` (DER) is given, as it is for
    notary-signer. "stream" sends two requests on one SignStream call and
    checks both answers, in order."""
    from signerd import signing
    from signerd.keys import parse_algorithm
    from signerd.notary import signer_pb2 as npb
    from signerd.v1 import signer_pb2 as pb

    alg = parse_algorithm(algorithm)
    with client_channel(target) as ch:
        if spki is None:
            spki = pb.Key.FromString(unary(ch, "/signerd.v1.SignerService/GetKey")(
                pb.GetKeyRequest(key_id=key_id).SerializeToString())).public_key_der
        raw_req, _ = request_bytes(rpc, key_id, data, 2)
        try:
            if rpc == "stream":
                call: grpc.StreamStreamMultiCallable[bytes, bytes] = ch.stream_stream(
                    _loadgen.PATHS[rpc])
                answers = list(call(iter([raw_req, raw_req]), timeout=30))
            else:
                raw = unary(ch, _loadgen.PATHS[rpc])(raw_req, timeout=30)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    if rpc == "v1":
        sigs = [pb.SignResponse.FromString(raw).signature]
    elif rpc == "notary":
        sigs = [npb.Signature.FromString(raw).content]
    else:
        if rpc == "stream":
            items = [i for a in answers for i in pb.SignStreamResponse.FromString(a).items]
            if len(items) != 2:
                return f"2 requests on one stream brought {len(items)} answers"
        else:
            items = list(pb.SignBatchResponse.FromString(raw).items)
        if any(i.code for i in items):
            return f"{rpc} item failed: {[i.error for i in items if i.code][0]}"
        sigs = [i.response.signature for i in items]
    for sig in sigs:
        try:
            signing.verify(spki, alg, sig, data, signing.SignOptions())
        except Exception as e:  # noqa: BLE001 - any failure to verify is the finding
            return f"signature does not verify: {type(e).__name__} {e}"
    return None


# -- the load generator processes -------------------------------------------------------


class LoadGen:
    """``procs`` persistent load-generating processes."""

    def __init__(self, procs: int, mode: str, channels: int) -> None:
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent, kid = SPAWN.Pipe()
            p = SPAWN.Process(target=_loadgen.main, args=(kid, mode, channels), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def cpu(self) -> float:
        return sum(_proc.cpu_seconds(p.pid) for p in self.procs)

    def hang_up(self, target: Target) -> None:
        """Close every connection to ``target`` (before stopping its daemon)."""
        for c in self.conns:
            c.send(("hang_up", target))
        for c in self.conns:
            c.recv()

    def close(self) -> None:
        for c in self.conns:
            c.send(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()

    def run(self, daemon: Daemon, target: Target, rpc: str, request: bytes, items: int,
            callers: int, s: Settings) -> dict[str, Any]:
        """One measurement point; CPU of daemon and load generator is read
        from /proc at the edges of the measuring window. On a machine so busy
        that this process woke too late to read them (a window under half
        the duration), or that the load generator did nothing in it, the
        point is measured again, up to twice."""
        for _ in range(2):
            point = self._run_once(daemon, target, rpc, request, items, callers, s)
            if point["window_s"] >= s.duration / 2 and (point["requests"] or point["errors"]):
                return point
            log(f"{rpc} at {callers} callers missed its window ({point['window_s']:.2f} s, "
                f"{point['requests']} requests; the machine is busy): measuring it again")
        return self._run_once(daemon, target, rpc, request, items, callers, s)

    def _run_once(self, daemon: Daemon, target: Target, rpc: str, request: bytes, items: int,
                  callers: int, s: Settings) -> dict[str, Any]:
        n = min(len(self.conns), callers)
        share = [callers // n + (1 if i < callers % n else 0) for i in range(n)]
        start_at = time.monotonic() + 0.3  # time for every process to get the command
        for conn, c in zip(self.conns, share, strict=False):
            conn.send(("run", Point(target, rpc, request, items, c, start_at, s.warmup,
                                    s.duration, s.stream_depth)))
        time.sleep(max(0.0, start_at + s.warmup - time.monotonic()))
        d0, g0, b0, w0 = daemon.cpu(), self.cpu(), _proc.busy_seconds(), time.monotonic()
        time.sleep(max(0.0, start_at + s.warmup + s.duration - time.monotonic()))
        d1, g1, b1, w1 = daemon.cpu(), self.cpu(), _proc.busy_seconds(), time.monotonic()
        mem = daemon.memory_mib()
        parts = [conn.recv() for conn in self.conns[:n]]
        lat = array("d")
        for part in parts:
            lat.frombytes(part["latencies"])
        done = sum(p["items"] for p in parts)
        errors = sum(p["errors"] for p in parts)
        window = w1 - w0
        return {
            "ops_per_s": round(done / s.duration, 1),
            "requests": len(lat),
            "errors": errors,
            "first_error": next((p["first_error"] for p in parts if p["first_error"]), ""),
            "p50_ms": round(quantile(lat, 0.50) * 1000, 3),
            "p99_ms": round(quantile(lat, 0.99) * 1000, 3),
            "daemon_cpu_cores": round((d1 - d0) / window, 2),
            "loadgen_cpu_cores": round((g1 - g0) / window, 2),
            # Everything else the machine did meanwhile (other users' work,
            # the kernel): the measure of how quiet the machine was.
            "other_cpu_cores": round(max(0.0, (b1 - b0) - (d1 - d0) - (g1 - g0)) / window, 2),
            "daemon_rss_mib": mem["rss_mib"],
            "window_s": round(window, 3),
        }


def quantile(values: array[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the scenarios ---------------------------------------------------------------------


Rates = dict[str, dict[str, float]]  # algorithm -> threads -> signatures/s


def token_rate_table(hsm: Hsm, keys: dict[str, str], s: Settings) -> tuple[Rates, Rates]:
    """The token's own rate and signerd's in-process signing path, per
    algorithm and thread count (see bench/_token.py)."""
    rates = child(_token.token_rates, hsm.module, hsm.conf, LABEL, hsm.pin_file, keys, [1, 2],
                  s.token_seconds)
    return ({alg: {k: round(v, 1) for k, v in r["token"].items()} for alg, r in rates.items()},
            {alg: {k: round(v, 1) for k, v in r["signerd"].items()} for alg, r in rates.items()})


def sweep(daemon: Daemon, target: Target, gen: LoadGen, keys: dict[str, str],
          rates: dict[str, dict[str, float]], s: Settings) -> tuple[list[dict[str, Any]],
                                                                  dict[str, str]]:
    """Every (rpc, algorithm, callers) point; also which RPCs were skipped and why."""
    data = payload(s.payload_bytes)
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for rpc in s.rpcs:
        if rpc == "stream" and s.loadgen_mode != "h2":
            skipped[rpc] = "SignStream is driven by the h2 load generator only"
            log(f"skipping {rpc}: {skipped[rpc]}")
            continue
        for alg in s.algorithms:
            problem = check_answer(target, rpc, keys[alg], alg, data)
            if problem is not None:
                if rpc in ("notary", "stream") and problem.startswith("UNIMPLEMENTED"):
                    skipped[rpc] = (f"the daemon does not serve {_loadgen.PATHS[rpc]} yet "
                                    f"({problem})")
                    log(f"skipping {rpc}: {problem}")
                    break
                raise RuntimeError(f"{rpc} {alg}: {problem}")
            request, items = request_bytes(rpc, keys[alg], data, s.batch_size)
            for callers in (s.stream_callers if rpc == "stream" else s.callers):
                point = gen.run(daemon, target, rpc, request, items, callers, s)
                one, two = rates[alg]["1"], rates[alg]["2"]
                point = {"rpc": rpc, "algorithm": alg, "callers": callers, **point,
                         "vs_token_1t": round(point["ops_per_s"] / one, 2) if one else None,
                         "vs_token_2t": round(point["ops_per_s"] / two, 2) if two else None}
                log_point(f"{rpc:6} {alg:10} {callers:3} callers", point, "daemon")
                results.append(point)
    return results, skipped


def floor_points(env: Env, gen: LoadGen, s: Settings) -> list[dict[str, Any]]:
    """The sweep's callers against the no-op server (see bench/_floor.py), one
    per gRPC stack in ``s.floor_modes``, measured in alternation (sync, aio,
    sync, aio...) so a slow minute hits both; SignStream at the stream
    callers too when the sweep has "stream". Rows: rpc "floor" (unary Sign)
    or "floor-stream", ``server`` the stack."""
    floors: dict[str, Floor] = {}
    try:
        for mode in s.floor_modes:
            floors[mode] = Floor.start(env, s, mode)
        request, _ = request_bytes("v1", "0" * 64, payload(s.payload_bytes), 1)
        kinds = [("floor", "v1", s.callers)]
        if "stream" in s.rpcs and s.loadgen_mode == "h2":
            kinds.append(("floor-stream", "stream", s.stream_callers))
        points = []
        for row, rpc, callers_list in kinds:
            for callers in callers_list:
                for mode, floor in floors.items():
                    target = env.target(floor.info["tcp"])
                    point = {"rpc": row, "algorithm": "-", "server": mode, "callers": callers,
                             **gen.run(floor, target, rpc, request, 1, callers, s),
                             "vs_token_1t": None, "vs_token_2t": None}
                    log_point(f"{row:12} {mode:4} {callers:3} callers", point)
                    points.append(point)
        return points
    finally:
        for floor in floors.values():
            gen.hang_up(env.target(floor.info["tcp"]))
            floor.stop()


def best_floor(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per floor row and caller count, the stack with the higher throughput
    and its p50: the most a Python gRPC signer can do here."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        if p["rpc"].startswith("floor"):
            key = (p["rpc"], p["callers"])
            if key not in best or p["ops_per_s"] > best[key]["ops_per_s"]:
                best[key] = p
    return [{"rpc": p["rpc"], "callers": p["callers"], "server": p["server"],
             "ops_per_s": p["ops_per_s"], "p50_ms": p["p50_ms"]} for p in best.values()]


def targets(results: list[dict[str, Any]], floors: list[dict[str, Any]],
            token_rate: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Issue 15's targets, from one run's points (P-256): single Sign (v1 and
    Notary) at 16 callers against the best floor's rate (target 0.8), p50 at
    one caller against the best floor's (target at most 1.3), and SignBatch
    and SignStream against notary-signer's single-Sign rate, the best of its
    points (target 1.0).

    ``ceiling_16`` is the most target 1 allows on this token even if signerd
    did no work of its own: a signature costs at least the floor's CPU per
    call plus the token's (1 / its one-thread rate), on the same CPUs, so the
    ratio cannot pass floor_us / (floor_us + token_us). Missing points give
    None."""
    def point(rpc: str, callers: int, server: str | None = None) -> dict[str, Any] | None:
        return next((r for r in results if r["rpc"] == rpc and r["callers"] == callers
                     and r["algorithm"] in ("ecdsa-p256", "-")
                     and (server is None or r.get("server") == server)), None)

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        return round(a[key] / b[key], 3) if a is not None and b is not None and b[key] else None

    best = {(f["rpc"], f["callers"]): f for f in floors}
    f16, f1 = best.get(("floor", 16)), best.get(("floor", 1))
    out: dict[str, Any] = {}
    floor16 = f16 and point("floor", 16, f16["server"])
    token_us = 1e6 / token_rate["ecdsa-p256"]["1"] if "ecdsa-p256" in token_rate else None
    if floor16 and token_us:
        floor_us = floor16["daemon_cpu_cores"] / floor16["ops_per_s"] * 1e6
        out["floor_us_per_call_16"] = round(floor_us, 1)
        out["token_us_per_signature"] = round(token_us, 1)
        out["ceiling_16"] = round(floor_us / (floor_us + token_us), 3)
    if f1 and token_us:  # one caller waits for the floor's round trip and the token, at least
        out["ceiling_p50_1"] = round((f1["p50_ms"] + token_us / 1000) / f1["p50_ms"], 3)
    for rpc in ("v1", "notary"):
        p16, p1 = point(rpc, 16), point(rpc, 1)
        out[f"{rpc}_16_vs_floor"] = ratio(p16, f16, "ops_per_s")
        out[f"{rpc}_p50_1_vs_floor"] = ratio(p1, f1, "p50_ms")
    peer = max((r for r in results if r["rpc"] == "peer"), key=lambda r: r["ops_per_s"],
               default=None)
    out["peer_best"] = peer and peer["ops_per_s"]
    out["peer_best_callers"] = peer and peer["callers"]
    for rpc in ("batch", "stream"):
        rows = [r for r in results if r["rpc"] == rpc and r["algorithm"] == "ecdsa-p256"]
        top = max(rows, key=lambda r: r["ops_per_s"], default=None)
        out[f"{rpc}_best_vs_peer"] = ratio(top, peer, "ops_per_s")
        out[f"{rpc}_best_callers"] = top and top["callers"]
        out[f"{rpc}_1_vs_peer"] = ratio(point(rpc, 1), peer, "ops_per_s")
    return out


def peer_points(env: Env, gen: LoadGen, daemon: Daemon, target: Target,
                keys: dict[str, str], skipped: dict[str, str], s: Settings,
                info: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """notary-signer's Sign, driven like signerd's Notary Sign: the same load
    generator, P-256 key, payload and callers. At each caller count it is
    measured in alternation with signerd's Notary Sign (``s.peer_rounds``
    times), so the pair saw the same minute. Returns its rows (rpc "peer")
    and the pairs; ``info`` gets its start time, memory and exit."""
    data = payload(s.payload_bytes)
    peer = Peer.start(env)
    peer_target = env.target(peer.info["tcp"])
    info["start_seconds"] = round(peer.start_seconds, 3)
    try:
        log(f"notary-signer pid {peer.pid} ready in {peer.start_seconds:.2f}s")
        key_id, spki = peer.create_key(peer_target)
        problem = check_answer(peer_target, "notary", key_id, "ecdsa-p256", data, spki=spki)
        if problem is not None:
            raise RuntimeError(f"notary-signer: {problem}")
        request, _ = request_bytes("notary", key_id, data, 1)
        ours = None
        if "notary" in s.rpcs and "notary" not in skipped and "ecdsa-p256" in keys:
            ours = request_bytes("notary", keys["ecdsa-p256"], data, 1)[0]
        rows, pairs = [], []
        for callers in s.peer_callers:
            for r in range(s.peer_rounds):
                point = {"rpc": "peer", "algorithm": "ecdsa-p256", "server": "notary-signer",
                         "callers": callers, "round": r,
                         **gen.run(peer, peer_target, "notary", request, 1, callers, s),
                         "vs_token_1t": None, "vs_token_2t": None}
                log_point(f"peer (notary-signer) {callers:3} callers", point)
                rows.append(point)
                if ours is not None:
                    mine = gen.run(daemon, target, "notary", ours, 1, callers, s)
                    log(f"  signerd Notary Sign, right after: {mine['ops_per_s']:9.1f}/s "
                        f"p50 {mine['p50_ms']:.3f} ms daemon {mine['daemon_cpu_cores']:.2f} "
                        f"loadgen {mine['loadgen_cpu_cores']:.2f} cores")
                    pairs.append({"callers": callers, "round": r, "notary_signer": point,
                                  "signerd_notary": mine})
        info.update(peer.memory_mib())
        return rows, pairs
    finally:
        gen.hang_up(peer_target)
        info.update(peer.stop())


def many_keys_hsm(env: Env, count: int, cache: Path = CACHE) -> tuple[Hsm, str]:
    """A copy of the cached token with ``count`` P-256 keys of purpose raw
    (bench/_fill.py; built on first use), and one of its key IDs."""
    from bench import _fill

    hsm, info = _fill.cached_token(env.module, cache, count, env.dir / "many-hsm")
    return hsm, str(info["sample"][-1])


def many_keys(env: Env, small: Daemon, small_target: Target, small_key: str, gen: LoadGen,
              s: Settings) -> dict[str, Any]:
    """Start time, latency and RSS with ``s.many_keys`` keys on the token,
    against the small daemon measured in alternation (so drift hits both)."""
    hsm, key = many_keys_hsm(env, s.many_keys, Path(s.cache_dir))
    daemon = start_daemon(env.write_config("many", hsm, s))
    target = env.target(daemon.info["tcp"])
    try:
        log(f"{s.many_keys} keys: daemon ready in {daemon.start_seconds:.2f}s "
            f"(tokens {daemon.info.get('tokens')})")
        data = payload(s.payload_bytes)
        problem = check_answer(target, "v1", key, "ecdsa-p256", data)
        if problem is not None:
            raise RuntimeError(f"many keys: {problem}")
        req_many, _ = request_bytes("v1", key, data, 1)
        req_small, _ = request_bytes("v1", small_key, data, 1)
        p50: dict[str, list[float]] = {"many": [], "small": []}
        rate: dict[str, list[float]] = {"many": [], "small": []}
        for _ in range(2):
            for name, d, t, req in (("small", small, small_target, req_small),
                                    ("many", daemon, target, req_many)):
                p50[name].append(gen.run(d, t, "v1", req, 1, 1, s)["p50_ms"])
                rate[name].append(gen.run(d, t, "v1", req, 1, 16, s)["ops_per_s"])
        mem = daemon.memory_mib()
    finally:
        gen.hang_up(target)
        stopped = daemon.stop()
    one_worker = None
    if s.workers > 1:  # each worker holds its own copy of the module's object store
        single = start_daemon(env.write_config("many-1", hsm, replace(s, workers=1)))
        try:
            one_worker = {"start_seconds": round(single.start_seconds, 3), **single.memory_mib()}
        finally:
            single.stop()
        log(f"{s.many_keys} keys, one worker: {json.dumps(one_worker)}")
    breakdown = child(_token.open_breakdown, hsm.module, hsm.conf, LABEL, hsm.pin_file)
    log(f"{s.many_keys} keys, start in one process: {json.dumps(breakdown)}")
    many_p50, small_p50 = statistics.median(p50["many"]), statistics.median(p50["small"])
    return {
        "keys": s.many_keys,
        "keys_loaded": breakdown["keys"],
        "start_seconds": round(daemon.start_seconds, 3),
        "small_start_seconds": round(small.start_seconds, 3),
        "p50_ms": many_p50,
        "small_p50_ms": small_p50,
        "p50_ratio": round(many_p50 / small_p50, 3) if small_p50 else None,
        "ops_per_s_16": statistics.median(rate["many"]),
        "small_ops_per_s_16": statistics.median(rate["small"]),
        **mem,
        **stopped,
        "one_worker": one_worker,
        "breakdown": breakdown,
    }


def cpu_available(seconds: float = 0.5) -> float:
    """How many cores the machine gives us right now: as many spinning
    processes as CPUs, CPU seconds obtained / wall seconds. On a quiet
    2-core machine this is about 2.0; other work on the machine lowers it."""
    n = os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=n, mp_context=SPAWN) as pool:
        start_at = time.monotonic() + 1.0  # every process started and waiting by then
        return round(sum(pool.map(_proc.spin, [start_at] * n, [seconds] * n)) / seconds, 2)


def versions() -> dict[str, str]:
    import google.protobuf

    out = {"python": platform.python_version(), "grpcio": grpc.__version__,
           "protobuf": google.protobuf.__version__}
    try:
        out["softhsm"] = subprocess.run(["softhsm2-util", "--version"], capture_output=True,
                                        text=True, check=False).stdout.strip()
    except OSError:
        pass
    notary = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "notary"], capture_output=True,
                            text=True, check=False)
    if notary.returncode == 0 and notary.stdout:
        out["notary_signer"] = f"notary {notary.stdout.strip()} (Debian)"
    return out


def run(s: Settings, out: Path | None) -> dict[str, Any]:
    load_before, cpu_before = _proc.loadavg(), cpu_available()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="signerd-bench-") as tmp:
        env = Env.create(Path(tmp))
        hsm = Hsm.create(env.dir / "hsm", env.module)
        daemon = start_daemon(env.write_config("small", hsm, s))
        gen: LoadGen | None = None
        try:
            log(f"daemon pid {daemon.pid} ready in {daemon.start_seconds:.2f}s, "
                f"{len(daemon.pids)} process(es)")
            target = env.target(daemon.info["tcp"])
            keys = create_keys(target, s.algorithms, max(s.small_keys, len(s.algorithms)))
            rates, path_rates = token_rate_table(hsm, keys, s)
            for alg, r in rates.items():
                log(f"token's own rate {alg}: {r['1']:.0f}/s one thread, {r['2']:.0f}/s two; "
                    f"signerd's Token.sign: {path_rates[alg]['1']:.0f}/s, "
                    f"{path_rates[alg]['2']:.0f}/s")
            gen = LoadGen(s.loadgen_procs, s.loadgen_mode, s.channels_per_proc)
            results, skipped = sweep(daemon, target, gen, keys, rates, s)
            pairs: list[dict[str, Any]] = []
            peer: dict[str, Any] = {}
            if s.peer and not os.access(NOTARY_SIGNER, os.X_OK):
                skipped["peer"] = (f"{NOTARY_SIGNER} is not installed (Debian's notary "
                                   "package; ./dev.sh test and ./dev.sh bench install it)")
                log(f"skipping the peer: {skipped['peer']}")
            elif s.peer:
                peer_rows, pairs = peer_points(env, gen, daemon, target, keys, skipped, s,
                                               peer)
                results += peer_rows
            if s.floor:
                results += floor_points(env, gen, s)
            many = None
            if s.many_keys:
                small_key = keys.get("ecdsa-p256") or next(iter(keys.values()))
                many = many_keys(env, daemon, target, small_key, gen, s)
                log(f"many keys: {json.dumps(many)}")
            mem = daemon.memory_mib()
        finally:
            if gen is not None:
                gen.close()
            stopped = daemon.stop()
        if stopped["exit_code"] != 0:
            raise RuntimeError(f"daemon exited with {stopped['exit_code']}: "
                               f"{daemon.stderr.read_text()[-4000:]}")
    doc = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": _proc.loadavg(), "cpu_available_before": cpu_before,
                    "cpu_available_after": cpu_available(), "versions": versions()},
        "settings": asdict(s),
        "daemon": {"start_seconds": round(daemon.start_seconds, 3), **mem, **stopped},
        "token_rate": rates,
        "token_rate_signerd_path": path_rates,
        "results": results,
        "skipped": skipped,
        "best_floor": best_floor(results),
        "targets": targets(results, best_floor(results), rates),
        "peer": peer,  # notary-signer: start_seconds, RSS, exit (-15: SIGTERM ends it)
        "peer_pairs": pairs,
        "many_keys": many,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(doc, indent=2) + "\n")
        tmp_out.replace(out)
    return doc


# -- the report ------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    """The results as Markdown tables (what README's Performance section shows)."""
    s, m, d = doc["settings"], doc["machine"], doc["daemon"]
    rates, ours = doc["token_rate"], doc["token_rate_signerd_path"]
    lines = [
        f"signerd with {s['workers']} worker(s) x {s['threads']} threads, cpu_affinity "
        f"{s.get('cpu_affinity', 'none')}, {s['sessions']} sessions, "
        f"audit log {'on' if s['audit'] else 'off'}, mutual TLS; "
        f"{s['payload_bytes']}-byte payload, batches of {s['batch_size']}. {m['cpus']} CPUs "
        f"shared with the load generator ({s['loadgen_procs']} processes); load average "
        f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after; CPU available "
        f"{m['cpu_available_before']:.2f} before, {m['cpu_available_after']:.2f} after "
        f"(of {m['cpus']}.0); other work on the machine during the measuring windows: at most "
        f"{max((r['other_cpu_cores'] for r in doc['results']), default=0):.2f} cores.",
        "",
        "| in-process, no RPC | 1 thread | 2 threads |",
        "| --- | ---: | ---: |",
    ]
    for alg, r in rates.items():
        lines.append(f"| {alg}: token's own rate | {r['1']:,.0f}/s | {r['2']:,.0f}/s |")
        lines.append(f"| {alg}: signerd's Token.sign | {ours[alg]['1']:,.0f}/s "
                     f"| {ours[alg]['2']:,.0f}/s |")
    lines += [
        "",
        "| RPC | key | callers | signatures/s | x token, 2 thr | p50 ms | p99 ms "
        "| daemon CPU | loadgen CPU | daemon RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        ratio = "-" if r["vs_token_2t"] is None else f"{r['vs_token_2t']:.2f}"
        rpc = f"{r['rpc']} ({r['server']})" if r.get("server") else r["rpc"]
        lines.append(
            f"| {rpc} | {r['algorithm']} | {r['callers']} | {r['ops_per_s']:,.0f} "
            f"| {ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['daemon_cpu_cores']:.2f} "
            f"| {r['loadgen_cpu_cores']:.2f} | {r['daemon_rss_mib']:.0f} |")
    for rpc, why in doc["skipped"].items():
        lines.append(f"\n{rpc}: not measured, {why}.")
    if doc.get("best_floor"):
        lines += ["", "Best Python floor (the faster stack of "
                  f"{' and '.join(s.get('floor_modes', ['sync']))}, measured in alternation): "
                  + "; ".join(f"{b['rpc']} {b['callers']} callers {b['ops_per_s']:,.0f}/s "
                              f"p50 {b['p50_ms']:.2f} ms ({b['server']})"
                              for b in doc["best_floor"]) + "."]
    t = doc.get("targets") or {}
    if t:
        def x(v: float | None) -> str:
            return "not measured" if v is None else f"{v:.2f}x"
        lines += ["", "| issue 15 target (P-256) | measured | target |", "| --- | ---: | ---: |",
                  f"| v1 Sign, 16 callers / best floor | {x(t['v1_16_vs_floor'])} | >= 0.8x |",
                  f"| Notary Sign, 16 callers / best floor | {x(t['notary_16_vs_floor'])} "
                  "| >= 0.8x |",
                  f"| v1 Sign p50, 1 caller / best floor's | {x(t['v1_p50_1_vs_floor'])} "
                  "| <= 1.3x |",
                  f"| Notary Sign p50, 1 caller / best floor's | {x(t['notary_p50_1_vs_floor'])} "
                  "| <= 1.3x |",
                  f"| SignBatch, best ({t['batch_best_callers']} callers) / notary-signer "
                  f"| {x(t['batch_best_vs_peer'])} | >= 1.0x |",
                  f"| SignStream, best ({t['stream_best_callers']} callers) / notary-signer "
                  f"| {x(t['stream_best_vs_peer'])} | >= 1.0x |",
                  f"| SignStream, one stream / notary-signer | {x(t['stream_1_vs_peer'])} "
                  "| >= 1.0x |"]
        if "ceiling_16" in t:
            lines += ["", f"Ceiling for single Sign at 16 callers on this token: the floor "
                      f"costs {t['floor_us_per_call_16']:.0f} µs of CPU per call and the "
                      f"token {t['token_us_per_signature']:.0f} µs per signature, on the same "
                      f"CPUs, so even with no work of signerd's own single Sign reaches at "
                      f"most {t['ceiling_16']:.2f}x the floor."]
        if "ceiling_p50_1" in t:
            lines += ["", f"Likewise one caller's p50 cannot go below the floor's plus the "
                      f"token's time: {t['ceiling_p50_1']:.2f}x the floor's p50."]
    if doc.get("peer_pairs"):
        lines += ["", "| Notary Sign, P-256, alternated | callers | notary-signer sig/s | p50 ms "
                  "| CPU | signerd sig/s | p50 ms | CPU | loadgen CPU (peer / signerd) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for pair in doc["peer_pairs"]:
            a, b = pair["notary_signer"], pair["signerd_notary"]
            lines.append(
                f"| round {pair['round'] + 1} | {pair['callers']} | {a['ops_per_s']:,.0f} "
                f"| {a['p50_ms']:.2f} | {a['daemon_cpu_cores']:.2f} | {b['ops_per_s']:,.0f} "
                f"| {b['p50_ms']:.2f} | {b['daemon_cpu_cores']:.2f} "
                f"| {a['loadgen_cpu_cores']:.2f} / {b['loadgen_cpu_cores']:.2f} |")
    peer = doc.get("peer")
    if peer and "rss_mib" in peer:
        lines += ["", f"notary-signer ({m['versions'].get('notary_signer', '?')}, memory key "
                  f"store, GOMAXPROCS = CPUs, not pinned): ready in {peer['start_seconds']:.2f} s, "
                  f"RSS {peer['rss_mib']:.0f} MiB after the points."]
    mk = doc.get("many_keys")
    if mk:
        lines += [
            "",
            "| token holding | start (spawn to ready) | p50, 1 caller | P-256 sig/s, 16 callers "
            "| daemon RSS (sum of HWM) MiB | PSS MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| {s['small_keys']} keys | {mk['small_start_seconds']:.2f} s "
            f"| {mk['small_p50_ms']:.2f} ms | {mk['small_ops_per_s_16']:,.0f} "
            f"| {d['rss_mib']:.0f} ({d['hwm_mib']:.0f}) | {d['pss_mib']:.0f} |",
            f"| {mk['keys']:,} keys | {mk['start_seconds']:.2f} s | {mk['p50_ms']:.2f} ms "
            f"| {mk['ops_per_s_16']:,.0f} | {mk['rss_mib']:.0f} ({mk['hwm_mib']:.0f}) "
            f"| {mk['pss_mib']:.0f} |",
        ]
        one = mk.get("one_worker")
        if one:
            lines.append(f"| {mk['keys']:,} keys, 1 worker | {one['start_seconds']:.2f} s | | "
                         f"| {one['rss_mib']:.0f} ({one['hwm_mib']:.0f}) | {one['pss_mib']:.0f} |")
        b = mk["breakdown"]
        lines += ["", f"Start with {mk['keys']:,} keys, step by step in one process: the "
                  f"module's C_Initialize {b['module_init_s']:.2f} s (RSS {b['rss_before_mib']:.0f}"
                  f" -> {b['rss_after_module_init_mib']:.0f} MiB), login and "
                  f"{s['sessions']} sessions {b['login_and_sessions_s']:.2f} s, signerd's key "
                  f"listing {b['key_listing_s']:.2f} s (RSS {b['rss_after_listing_mib']:.0f} MiB)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    from signerd.config import CPU_AFFINITIES, ENGINES

    d = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: P-256, 1 and 4 callers, 0.25 s points, 50 keys")
    p.add_argument("--algorithms", default=",".join(d.algorithms))
    p.add_argument("--rpcs", default=",".join(d.rpcs))
    p.add_argument("--callers", default=",".join(map(str, d.callers)))
    p.add_argument("--duration", type=float, default=d.duration, help="seconds per point")
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--token-seconds", type=float, default=d.token_seconds)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--many-keys", type=int, default=d.many_keys, help="0 skips the scenario")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--cpu-affinity", choices=CPU_AFFINITIES, default=d.cpu_affinity)
    p.add_argument("--engine", choices=ENGINES, default=d.engine, help="[server] engine")
    p.add_argument("--sessions", type=int, default=d.sessions)
    p.add_argument("--no-audit", action="store_true", help="measure without the audit log")
    p.add_argument("--stream-callers", default=",".join(map(str, d.stream_callers)),
                   help="callers for SignStream (each keeps one stream open)")
    p.add_argument("--stream-depth", type=int, default=d.stream_depth,
                   help="SignStream requests outstanding per caller")
    p.add_argument("--no-floor", action="store_true", help="skip the no-op server baseline")
    p.add_argument("--floor-modes", default=",".join(d.floor_modes),
                   help="gRPC stacks for the floor: sync, aio (grpc.aio on uvloop)")
    # On by default: where notary-signer is not installed, the results say so in
    # "skipped" (a run that silently left the peer out read like a complete one).
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also measure stock notary-signer ({NOTARY_SIGNER}, Debian's notary "
                        "package); recorded as skipped where it is not installed")
    p.add_argument("--peer-callers", default=",".join(map(str, d.peer_callers)))
    p.add_argument("--peer-rounds", type=int, default=d.peer_rounds,
                   help="alternations of notary-signer and signerd's Notary Sign per callers")
    p.add_argument("--loadgen-procs", type=int, default=d.loadgen_procs)
    p.add_argument("--loadgen-mode", choices=("threads", "aio", "h2"), default=d.loadgen_mode)
    p.add_argument("--channels", type=int, default=d.channels_per_proc,
                   help="connections per load generator process")
    p.add_argument("--cache", default=d.cache_dir,
                   help="directory for the many-keys token (kept between runs)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                   help="where the JSON goes ('-' for nowhere)")
    a = p.parse_args(argv)
    s = Settings(
        algorithms=tuple(x for x in a.algorithms.split(",") if x),
        rpcs=tuple(x for x in a.rpcs.split(",") if x),
        callers=tuple(int(x) for x in a.callers.split(",") if x),
        duration=a.duration, warmup=a.warmup, token_seconds=a.token_seconds,
        batch_size=a.batch_size, many_keys=a.many_keys, workers=a.workers, threads=a.threads,
        cpu_affinity=a.cpu_affinity,
        engine=a.engine,
        sessions=a.sessions, audit=not a.no_audit, floor=not a.no_floor,
        stream_callers=tuple(int(x) for x in a.stream_callers.split(",") if x),
        stream_depth=a.stream_depth,
        floor_modes=tuple(x for x in a.floor_modes.split(",") if x),
        peer=a.peer, peer_callers=tuple(int(x) for x in a.peer_callers.split(",") if x),
        peer_rounds=a.peer_rounds,
        loadgen_procs=a.loadgen_procs,
        loadgen_mode=a.loadgen_mode, channels_per_proc=a.channels, cache_dir=a.cache,
    )
    if a.smoke:
        s = replace(s, algorithms=("ecdsa-p256",), callers=(1, 4), duration=0.25, warmup=0.05,
                    token_seconds=0.1, batch_size=10, many_keys=50, stream_callers=(1, 4),
                    peer_callers=(1, 4), peer_rounds=1)
    return s, (None if str(a.out) == "-" else a.out)


def main(argv: list[str] | None = None) -> int:
    s, out = parse_args(argv)
    for alg in s.algorithms:
        if alg not in ALGORITHMS:
            raise SystemExit(f"unknown algorithm {alg!r}; choose from {', '.join(ALGORITHMS)}")
    for mode in s.floor_modes:
        if mode not in FLOOR_MODES:
            raise SystemExit(f"unknown floor mode {mode!r}; choose from sync, aio")
    doc = run(s, out)
    print(markdown(doc))
    if out is not None:
        log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
