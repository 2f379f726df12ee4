"""Shared fixtures: a real SoftHSM, real certificates, real daemons on loopback.

Nothing here mocks PKCS#11, gRPC or TLS. SoftHSM missing is a failure, never
a skip: ``./dev.sh test`` installs it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench import _proc
from signerd import embedded, pki
from signerd.client import Client, ClientConfig
from signerd.config import Config, Pkcs11Uri, TokenConfig, parse_config
from signerd.server import app
from tests import _tpm, _yubihsm

ADMIN = "spiffe://test/admin"
RUNNER = "spiffe://ci/runner-1"
TOKENS = ("root", "online")


@dataclass
class HSM:
    """A SoftHSM directory with two initialised tokens: root and online."""

    dir: Path
    conf: Path
    module: str
    pins: dict[str, Path]

    def token_table(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "module": self.module,
            "uri": f"pkcs11:token=test-{name}",
            "pin_file": str(self.pins[name]),
            "roles": ["root"] if name == "root" else ["*"],
            **extra,
        }


def make_hsm(base: Path) -> HSM:
    try:
        module = embedded.softhsm_module()
    except Exception as e:  # noqa: BLE001 - reported as a test failure
        pytest.fail(f"SoftHSM is required for these tests and is missing: {e}")
    base.mkdir(parents=True, exist_ok=True)
    (base / "tokens").mkdir(exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    pins = {}
    for name in TOKENS:
        pin = secrets.token_hex(8).encode()
        pins[name] = base / f"{name}.pin"
        pki.write_private(pins[name], pin)
        embedded.init_softhsm_token(module, conf, f"test-{name}", pin, b"so-" + pin)
    return HSM(base, conf, module, pins)


def make_hsm_apart(base: Path) -> HSM:
    """:func:`make_hsm` in a process of its own, for tokens in a directory of their
    own. SoftHSM reads its config once per process: once this process has loaded
    it (the session's ``hsm``), initialising more tokens here would put them in
    the session's token directory, beside tokens of the same labels."""
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from tests.conftest import make_hsm; make_hsm(Path(sys.argv[1]))", str(base)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        pytest.fail(f"cannot make SoftHSM tokens in {base}: {run.stderr[-2000:]}")
    return HSM(base, base / "softhsm2.conf", embedded.softhsm_module(),
               {name: base / f"{name}.pin" for name in TOKENS})


def hsm_token(hsm: HSM, name: str) -> TokenConfig:
    """The config of one of the test tokens, for a Token opened directly."""
    return TokenConfig(name=name, module=hsm.module, uri=Pkcs11Uri(token=f"test-{name}"),
                       pin_file=hsm.pins[name])


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> HSM:
    h = make_hsm(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(h.conf)  # one SoftHSM config for this process
    return h


@pytest.fixture(scope="session")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_tpm.Tpm]:
    """The TPM stack (tests/_tpm.py), once per test session and process: its
    environment is set here before tpm2-pkcs11 is first initialised, and
    tpm2-abrmd's TCTI keeps the first D-Bus session bus it reached, so a
    second stack in one process could not be reached."""
    gone = _tpm.missing()
    if gone:
        message = f"the TPM 2.0 stack is missing ({', '.join(gone)}); ./dev.sh test installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    t = _tpm.start(tmp_path_factory.mktemp("tpm"))
    os.environ.update(t.env)
    yield t
    t.stop()


@pytest.fixture(scope="session")
def yubihsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_yubihsm.YubiHsm]:
    """A software YubiHSM 2 (tests/_yubihsm) below Yubico's real PKCS#11
    module, once per test session and process: the module reads
    YUBIHSM_PKCS11_CONF at its first C_Initialize, so the variable is set
    here and the connector keeps its port for the whole session."""
    gone = _yubihsm.missing()
    if gone:
        message = (f"Yubico's PKCS#11 module is missing ({', '.join(gone)}); "
                   "./dev.sh test installs it")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    y = _yubihsm.start(tmp_path_factory.mktemp("yubihsm"))
    os.environ.update(y.env)
    yield y
    y.stop()


def yubihsm_token(y: _yubihsm.YubiHsm, name: str = "yubihsm") -> TokenConfig:
    """The config of the software YubiHSM's token, for a Token opened directly."""
    return TokenConfig(name=name, module=_yubihsm.MODULE, uri=Pkcs11Uri(token=_yubihsm.LABEL),
                       pin_file=y.pin_file)


@dataclass
class PKI:
    dir: Path
    ca: pki.Issued
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def add(self, name: str, issued: pki.Issued) -> tuple[Path, Path]:
        paths = (self.dir / f"{name}.pem", self.dir / f"{name}-key.pem")
        issued.write(*paths)
        self.files[name] = paths
        return paths

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca("signerd test CA")
    p = PKI(d, ca)
    ca.write(d / "ca.pem", d / "ca-key.pem")
    p.add("server", pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)))
    p.add("admin", pki.issue(ca, "admin", server=False, uris=(ADMIN,)))
    p.add("runner", pki.issue(ca, "runner-1", server=False, uris=(RUNNER,)))
    p.add("dns-only", pki.issue(ca, "cn-ignored", server=False, dns=("builder.ci.example",)))
    p.add("cn-only", pki.issue(ca, "plain-cn", server=False))
    p.add("nobody", pki.issue(ca, "nobody", server=False, uris=("spiffe://test/nobody",)))
    p.add(
        "expired",
        pki.issue(
            ca,
            "expired",
            server=False,
            uris=(ADMIN,),
            days=1,
            not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        ),
    )
    other = pki.make_ca("some other CA")
    p.add("foreign", pki.issue(other, "foreign", server=False, uris=(ADMIN,)))
    return p


ADMIN_POLICY = f"""
[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["*"]
roles = ["*", "root"]

[[rule]]
name = "local-unix"
identities = ["uid:{os.getuid()}"]
operations = ["*"]
transports = ["unix"]
"""


# SIGNERD_TEST_ENGINE=threads|aio runs the in-process daemons on that engine
# (default: the config's default).
ENGINE = ({"engine": os.environ["SIGNERD_TEST_ENGINE"]}
          if os.environ.get("SIGNERD_TEST_ENGINE") else {})


def daemon_config(
    hsm: HSM,
    certs: PKI,
    workdir: Path,
    policy: str = ADMIN_POLICY,
    server: dict[str, Any] | None = None,
    tokens: tuple[str, ...] = TOKENS,
    audit: bool = True,
    metrics: bool = False,
    metrics_listen: str | None = None,
) -> dict[str, Any]:
    """A signerd config (as a TOML-shaped dict) for tests; ``metrics`` serves
    /metrics, /livez and /readyz on a free loopback port (or ``metrics_listen``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.toml").write_text(policy)
    cert, key = certs.files["server"]
    cfg: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "threads": 16, **ENGINE, **(server or {})},
        "tls": {"cert": str(cert), "key": str(key), "client_ca": str(certs.ca_file)},
        "policy": {"file": str(workdir / "policy.toml")},
        "environment": {"SOFTHSM2_CONF": str(hsm.conf)},
        "tokens": [hsm.token_table(t) for t in tokens],
    }
    if audit:
        cfg["audit"] = {"file": str(workdir / "audit.log")}
    if metrics or metrics_listen:
        cfg["metrics"] = {"listen": metrics_listen or "127.0.0.1:0"}
    return cfg


@dataclass
class Daemon:
    """An in-process signerd (real gRPC server, real mTLS, real token)."""

    config: Config
    servers: app.Servers
    certs: PKI
    workdir: Path

    @property
    def port(self) -> int:
        return self.servers.ports["tcp"]

    def client_config(self, who: str = "admin") -> ClientConfig:
        cert, key = self.certs.files[who]
        return ClientConfig(
            f"127.0.0.1:{self.port}", self.certs.ca_file, cert, key, "localhost", timeout=20
        )

    def client(self, who: str = "admin") -> Client:
        return Client(self.client_config(who))

    def unix_client(self) -> Client:
        assert self.config.unix_socket is not None
        return Client(ClientConfig(f"unix:{self.config.unix_socket}", timeout=20))

    def stop(self) -> None:
        self.servers.stop(grace=5)


def start_daemon(cfg: dict[str, Any], certs: PKI, workdir: Path) -> Daemon:
    config = parse_config(cfg, workdir)
    servers = app.open_servers(config)
    servers.start()
    return Daemon(config, servers, certs, workdir)


def started_checkpointer(d: Daemon, timeout: float = 30) -> Any:
    """``d``'s audit Checkpointer once its tree is started: a first start chooses the
    checkpoint key after serving has begun (signerd.audit.Checkpointer)."""
    cp = d.servers.checkpointer
    assert cp is not None and cp.wait_started(timeout), "the audit tree did not start"
    return cp


@pytest.fixture
def daemon_factory(hsm: HSM, certs: PKI, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(name: str = "d", **kwargs: Any) -> Daemon:
        workdir = tmp_path / name
        d = start_daemon(daemon_config(hsm, certs, workdir, **kwargs), certs, workdir)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()


def unique_gun(prefix: str = "docker.io/test") -> str:
    return f"{prefix}/app-{secrets.token_hex(4)}"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Tiny TOML writer for test configs (tables, arrays of tables, scalars, lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    for section, body in data.items():
        for table in body if isinstance(body, list) else [body]:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    stderr: Path

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.stderr.read_text()


def spawn_daemon(
    config_path: Path | None,
    workdir: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 60,
    prefix: tuple[str, ...] = (),
) -> Process:
    """Run ``signerd serve`` as a separate process and wait until it serves.
    ``prefix`` runs it through another command (``prefix... python -m ...``)."""
    ready = workdir / f"ready-{secrets.token_hex(4)}.json"
    stderr = workdir / f"signerd-{secrets.token_hex(4)}.log"
    # setpriv: SIGTERM when pytest dies, so no daemon outlives a killed run;
    # see tests/_tpm.py on why not a preexec_fn.
    cmd = [*_tpm.DIE_WITH_PARENT, *prefix, sys.executable, "-m", "signerd.daemon", "serve",
           "--ready-file", str(ready), *args]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("wb"),
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"signerd exited with {proc.returncode}: {stderr.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"signerd did not start in {timeout}s: {stderr.read_text()}")
        time.sleep(0.05)
    return Process(proc, json.loads(ready.read_text()), stderr)


def threads_taking_signals(pid: int) -> list[str]:
    """Threads of ``pid`` but its main one that do not block SIGHUP, SIGINT
    and SIGTERM (the main thread takes them with sigwait, which unblocks them
    while it waits)."""
    wanted = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    return [f"{tid} {status['Name']}" for tid, status in _proc.thread_statuses(pid)
            if tid != pid and int(status["SigBlk"], 16) & wanted != wanted]


def anonymous_client_cert(certs: PKI, directory: Path) -> tuple[Path, Path]:
    """A client certificate from the test CA with no URI SAN, DNS SAN or CN
    (nothing to identify its holder by), and its key: (cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]))
            .issuer_name(certs.ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(certs.ca.key, hashes.SHA256()))
    paths = directory / "anon.pem", directory / "anon-key.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def rpc_error(fn: Any) -> grpc.RpcError:
    """Call fn and return the grpc.RpcError it raises (failing if it does not)."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value
