"""deploy/systemd/signerd.service: it verifies, its exposure score, sd_notify for real,
and the daemon serving under the unit's seccomp rules.

systemd-analyze missing is a failure, never a skip; under CI=true the test
installs it first (Debian package ``systemd``, which installs and runs its
tools in a container without systemd as PID 1).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from signerd import audit, signing
from signerd.client import Client, ClientConfig
from signerd.keys import parse_algorithm
from tests.conftest import HSM, PKI, Process, daemon_config, spawn_daemon, unique_gun, write_toml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "signerd.service"
SANDBOX = Path(__file__).resolve().parent / "seccomp_sandbox.py"
MAX_EXPOSURE = 2.0  # systemd-analyze security's score for the unit must stay at or below


def tool(name: str, package: str) -> str:
    """Path of the program ``name``; under CI=true its Debian ``package`` is
    installed first if it is missing. Missing is a failure, never a skip."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None and os.environ.get("CI") == "true":
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]):
            subprocess.run([*sudo, *cmd], env=env, capture_output=True, timeout=600, check=False)
        found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} is required for these tests (Debian: apt-get install {package}); "
                    "with CI=true they install it themselves")
    return found


def systemd_analyze() -> str:
    return tool("systemd-analyze", "systemd")


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's signerd: verify checks
    that the binary exists, and /opt/signerd/bin/signerd does not here
    (test_install_script_writes_a_unit_that_verifies checks the unit as
    deploy/install.sh writes it)."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/signerd/bin/signerd serve " in text
    signerd = Path(sys.executable).parent / "signerd"
    assert signerd.exists()
    copy = tmp_path / "signerd.service"
    copy.write_text(text.replace("/opt/signerd/bin/signerd", str(signerd)))
    return copy


def unit_options(text: str) -> dict[str, list[str]]:
    """``Key=value`` settings of a unit file, every value of a repeated key in order."""
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key.strip(), []).append(value.strip())
    return options


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_copy(tmp_path)
    run = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60)
    # verify exits 0 even for unknown keys or bad values, which it only prints
    assert (run.returncode, run.stdout + run.stderr) == (0, "")
    broken = tmp_path / "broken" / "signerd.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter")
                      .replace("LockPersonality=yes", "LockPersonallity=yes"))
    run = subprocess.run([tool, "verify", "--man=no", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert "Failed to parse protect system value" in run.stderr
    assert "Unknown key 'LockPersonallity'" in run.stderr


def test_unit_has_the_settings_signerd_relies_on() -> None:
    o = unit_options(UNIT.read_text())
    single = {k: v[-1] for k, v in o.items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["User"] == "signerd" and single["Group"] == "signerd"
    assert single["RestartPreventExitStatus"] == "2"  # daemon.main: config fault or bad PIN
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
                       ("LockPersonality", "yes"), ("CapabilityBoundingSet", ""),
                       ("UMask", "0077"), ("MemoryDenyWriteExecute", "yes"),
                       ("SystemCallErrorNumber", "EPERM")]:
        assert single[key] == value, key
    assert o["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert set(single["ReadWritePaths"].split()) >= {"/var/lib/signerd", "/var/log/signerd"}


def test_unit_security_exposure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = systemd_analyze()
    usage = subprocess.run([tool, "security", "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    assert "--offline" in usage, "this systemd-analyze has no 'security --offline' (systemd < 250)"
    run = subprocess.run([tool, "security", "--offline=true", "--no-pager",
                          str(unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    m = re.search(r"Overall exposure level for signerd\.service: (\d+\.\d+) (\w+)", run.stdout)
    assert m is not None, run.stdout[-2000:]
    score, rating = float(m.group(1)), m.group(2)
    with capsys.disabled():  # recorded in the test output, not only on failure
        version = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[0]
        print(f"\n[test_deploy] systemd-analyze security --offline=true signerd.service: "
              f"exposure {score} {rating} ({version})")
    assert score <= MAX_EXPOSURE, run.stdout
    for setting in ("MemoryDenyWriteExecute=", "PrivateDevices=", "ProtectSystem=",
                    "RestrictNamespaces=~user", "SystemCallFilter=~@privileged"):
        line = next(x for x in run.stdout.splitlines() if setting in x)
        assert line.lstrip().startswith("✓"), line


# -- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
        tuple[socket.socket, str]]:
    """A datagram socket like systemd's: SO_PASSCRED, so each message carries
    its sender's pid (what NotifyAccess=main checks)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if getattr(request, "param", "path") == "abstract":
        name = f"@signerd-test-{secrets.token_hex(6)}"
        s.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify.sock")
        s.bind(name)
    s.settimeout(60)
    yield s, name
    s.close()


def receive(s: socket.socket) -> tuple[int, str]:
    """(sender pid, message) of the next datagram."""
    data, ancillary, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pids = [struct.unpack("3i", d[:12])[0] for level, kind, d in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(pids) == 1
    return pids[0], data.decode()


@pytest.mark.parametrize("notify_socket", ["path", "abstract"], indirect=True)
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sd_notify_ready_reload_stopping(hsm: HSM, certs: PKI, tmp_path: Path, workers: int,
                                         notify_socket: tuple[socket.socket, str]) -> None:
    s, name = notify_socket
    cfg = write_toml(tmp_path / "signerd.toml",
                     daemon_config(hsm, certs, tmp_path, server={"workers": workers}))
    proc = spawn_daemon(cfg, tmp_path, env={"NOTIFY_SOCKET": name})
    main = proc.proc.pid
    try:
        pid, msg = receive(s)  # sent once the ready file is written, so it has arrived
        assert (pid, msg.splitlines()[0]) == (main, "READY=1")
        assert msg.splitlines()[1].startswith("STATUS=serving")
        proc.proc.send_signal(signal.SIGHUP)
        pid, msg = receive(s)
        m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", msg)
        assert pid == main and m is not None, msg
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 <= now - int(m.group(1)) < 60_000_000
        assert receive(s) == (main, "READY=1")
        proc.proc.send_signal(signal.SIGTERM)
        assert receive(s) == (main, "STOPPING=1")
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
    # Nothing else: with workers, only the supervisor (the main PID) may notify.
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):
        s.recv(4096)


def test_no_notify_socket_means_no_notification(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    from signerd.daemon import _sdnotify

    assert not _sdnotify.notify(_sdnotify.READY)  # pytest runs without NOTIFY_SOCKET
    cfg = write_toml(tmp_path / "signerd.toml", daemon_config(hsm, certs, tmp_path))
    proc = spawn_daemon(cfg, tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert proc.stop() == 0
    assert "cannot notify the service manager" in proc.log()  # a warning, not a failure


# -- the unit's seccomp rules, for real

PROBE = r"""
import ctypes, errno, json, mmap, os, socket
r = {}
def attempt(name, fn):
    try:
        fn()
        r[name] = "allowed"
    except OSError as e:
        r[name] = errno.errorcode[e.errno]
attempt("wx_mmap", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                     | mmap.PROT_EXEC))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
attempt("setgroups", lambda: os.setgroups(os.getgroups()))
# A ctypes callback (a libffi closure) called from C: qsort with a Python comparator.
libc = ctypes.CDLL(None)
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
values = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
cmp = CMP(lambda a, b: a[0] - b[0])
libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), cmp)
r["callback"] = list(values)
print(json.dumps(r))
"""


def sandboxed(*cmd: str) -> tuple[str, ...]:
    return (sys.executable, str(SANDBOX), "--", *cmd)


def test_the_sandbox_refuses_what_the_unit_refuses() -> None:
    systemd_analyze()  # the sandbox expands systemd's groups with it
    free = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True,
                                     text=True, timeout=60, check=True).stdout)
    jailed = subprocess.run(list(sandboxed(sys.executable, "-c", PROBE)), capture_output=True,
                            text=True, timeout=60)
    assert jailed.returncode == 0, jailed.stderr
    assert free == {"wx_mmap": "allowed", "netlink": "allowed", "setgroups": "allowed",
                    "callback": [1, 2, 3, 4, 5]}
    # W^X mappings, netlink and @privileged calls are refused; ctypes callbacks
    # still work (libffi 3.4 needs no writable+executable page for a closure).
    assert json.loads(jailed.stdout) == {"wx_mmap": "EPERM", "netlink": "EAFNOSUPPORT",
                                         "setgroups": "EPERM", "callback": [1, 2, 3, 4, 5]}


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_daemon_serves_under_the_units_seccomp_rules(hsm: HSM, certs: PKI, tmp_path: Path,
                                                     workers: int) -> None:
    systemd_analyze()
    data = daemon_config(hsm, certs, tmp_path,
                         server={"workers": workers, "cpu_affinity": "spread"})
    cfg = write_toml(tmp_path / "signerd.toml", data)
    proc: Process = spawn_daemon(cfg, tmp_path, prefix=sandboxed())
    try:
        for pid in [proc.info["pid"], *proc.info.get("workers", [])]:
            status = _status(pid)
            assert (status["Seccomp"], status["Seccomp_filters"], status["NoNewPrivs"]) == (
                "2", "3", "1"), pid
        cert, key = certs.files["admin"]
        client = Client(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                                     "localhost", 20))
        with client as c:
            for alg in ("ecdsa-p256", "ed25519", "rsa-2048"):
                # A raw key: opaque bytes are not a metadata key's to sign (issue 23).
                made = c.create_key(unique_gun(), "targets", alg, purpose="raw")
                sig = c.sign(made.key_id, message=b"sandboxed").signature
                signing.verify(made.public_key_der, parse_algorithm(alg), sig, b"sandboxed",
                               signing.SignOptions())
        proc.proc.send_signal(signal.SIGHUP)  # policy reload
        proc.proc.send_signal(signal.SIGUSR1)  # audit rotation (SIGHUP no longer rotates)
        _wait_for("a rotated audit log", lambda: any(
            re.search(r"\.\d{8}T\d{6}Z(_\d{3})?$", p.name) for p in tmp_path.glob("audit.log*")))
    finally:
        assert proc.stop() == 0
    log = proc.log()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    assert not [x for x in lines if x["level"] in ("error", "critical")], log
    assert "cannot pin" not in log and "pinned to one CPU" in log  # sched_setaffinity allowed
    names = ["audit.log"] if workers == 1 else [f"audit.log.w{i}" for i in range(1, workers + 1)]
    for name in names:
        rotated = sorted(tmp_path.glob(name + ".2*"))
        result = audit.verify_files([*rotated, tmp_path / name])
        assert result.ok, audit.format_result(result)


# -- deploy/logrotate/signerd


def test_logrotate_config_renames_and_the_chain_holds(tmp_path: Path) -> None:
    """logrotate (this file, paths moved to a temp dir) renames the live log
    twice while a writer keeps writing and rotating by itself; every file,
    compressed ones included, verifies as one chain."""
    logrotate = tool("logrotate", "logrotate")
    conf = tmp_path / "signerd.logrotate"
    text = (ROOT / "deploy" / "logrotate" / "signerd").read_text()
    assert "\n    su signerd signerd\n" in text and "nocopytruncate" in text
    # As root in a temp dir: no user switch (there is no signerd user here), and
    # no signerd unit to signal: the writer notices each rename at its next write.
    conf.write_text(text.replace("/var/log/signerd", str(tmp_path))
                    .replace("    su signerd signerd\n", "")
                    .replace(POSTROTATE, "true"))
    path = tmp_path / "audit.log"
    log = audit.AuditLog(path)
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            log.write({"operation": "sign", "n": written[0]})
            written[0] += 1
            time.sleep(0.001)

    def run_logrotate() -> None:
        run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TZ": "UTC"})
        assert run.returncode == 0, run.stderr

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        run_logrotate()
        time.sleep(0.3)
        for _ in range(3):  # signerd's own, in logrotate's second or the next: _NNN names
            log.rotate()
            time.sleep(0.05)
        time.sleep(1.1)  # logrotate refuses a name that exists: a second of its own
        run_logrotate()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        log.close()
    files = sorted(tmp_path.glob("audit.log.2*"))
    renamed = [json.loads(line)["previous_file"] for p in [*files[1:], path]
               for line in _first_lines(p)]
    assert renamed.count(None) == 2  # logrotate's two renames
    assert any(p.name.endswith(".gz") for p in files)  # compress (delayed) ran
    result = audit.verify_files([*files, path])
    assert result.ok, audit.format_result(result)
    assert result.lines == written[0] + len(files)


POSTROTATE = ("if /bin/systemctl -q is-active signerd.service; then /bin/systemctl kill "
              "--signal=SIGUSR1 --kill-who=main signerd.service; fi")


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_logrotate_postrotate_makes_signerd_start_the_new_file_at_once(
        hsm: HSM, certs: PKI, tmp_path: Path, workers: int) -> None:
    """How logrotate drives rotation (issue 21 §7): it renames the live log,
    then its postrotate sends signerd's main process SIGUSR1 once, and signerd
    (every worker, through the supervisor) starts the new file at once, before
    any request, chained to the renamed one. Run literally, with the unit's
    systemctl call replaced by the same signal to the daemon's main PID."""
    logrotate = tool("logrotate", "logrotate")
    text = (ROOT / "deploy" / "logrotate" / "signerd").read_text()
    assert POSTROTATE in text and "\n    sharedscripts\n" in text
    cfg = write_toml(tmp_path / "signerd.toml",
                     daemon_config(hsm, certs, tmp_path, server={"workers": workers}))
    proc = spawn_daemon(cfg, tmp_path)
    names = ["audit.log"] if workers == 1 else [f"audit.log.w{i}" for i in range(1, workers + 1)]
    try:
        clients = [_admin(certs, proc) for _ in range(4 * workers)]  # connections spread
        for c in clients:
            c.create_key(unique_gun(), "targets")
        live = [n for n in names if (tmp_path / n).stat().st_size]
        conf = tmp_path / "signerd.logrotate"
        conf.write_text(text.replace("/var/log/signerd", str(tmp_path))
                        .replace("    su signerd signerd\n", "")
                        .replace(POSTROTATE, f"kill -USR1 {proc.proc.pid}"))
        run = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TZ": "UTC"})
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 20
        def started(n: str) -> bool:  # the new file exists and holds its first whole line
            path = tmp_path / n
            return path.exists() and path.read_bytes().endswith(b"\n")

        while not all(started(n) for n in live):
            assert time.monotonic() < deadline, "no new file after logrotate's postrotate"
            time.sleep(0.05)
        for n in live:  # nothing was signed meanwhile: the new file holds the link alone
            [first] = (tmp_path / n).read_bytes().splitlines()
            doc = json.loads(first)
            assert (doc["operation"], doc["reason"], doc["previous_file"]) == (
                audit.ROTATE_OPERATION, "renamed", None)
        for c in clients:
            c.sign(c.create_key(unique_gun(), "targets", purpose="raw").key_id, message=b"m")
            c.close()
    finally:
        assert proc.stop() == 0
    for n in live:
        rotated = sorted(tmp_path.glob(n + ".2*"))
        assert len(rotated) == 1, rotated  # logrotate's one rename; no second rotation
        result = audit.verify_files([*rotated, tmp_path / n])
        assert result.ok, audit.format_result(result)


def _admin(certs: PKI, proc: Process) -> Client:
    cert, key = certs.files["admin"]
    return Client(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                               "localhost", 30))


def _first_lines(path: Path) -> list[bytes]:
    import gzip

    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return data.splitlines()[:1]


# -- exit status: what RestartPreventExitStatus=2 relies on


@pytest.mark.parametrize(("problem", "workers", "status"), [
    pytest.param("wrong-pin", 1, 2, id="refused-pin"),
    pytest.param("wrong-pin", 2, 2, id="refused-pin-in-a-worker"),
    pytest.param("bad-config", 1, 2, id="config-fault"),
    pytest.param("no-such-token", 1, 3, id="token-not-reachable"),
    # Regression: exit 2, so the unit never retried a port the old daemon still held.
    pytest.param("port-in-use", 1, 3, id="port-in-use"),
    pytest.param("port-in-use", 2, 3, id="port-in-use-with-workers"),
])
def test_start_failures_exit_2_only_when_a_restart_cannot_help(
        hsm: HSM, certs: PKI, tmp_path: Path, problem: str, workers: int, status: int) -> None:
    data = daemon_config(hsm, certs, tmp_path, server={"workers": workers}, tokens=("online",))
    if problem == "wrong-pin":
        (tmp_path / "wrong.pin").write_text("not-the-pin")
        (tmp_path / "wrong.pin").chmod(0o600)
        data["tokens"][0]["pin_file"] = str(tmp_path / "wrong.pin")
    elif problem == "bad-config":
        data["audit"]["max_bytes"] = 10
    elif problem == "no-such-token":
        data["tokens"][0]["uri"] = "pkcs11:token=no-such-token"
    holder = socket.socket()  # another program on the port, for "port-in-use"
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    if problem == "port-in-use":
        data["server"]["listen"] = f"127.0.0.1:{holder.getsockname()[1]}"
    cfg = write_toml(tmp_path / "signerd.toml", data)
    with holder:
        run = subprocess.run([sys.executable, "-m", "signerd.daemon", "serve", "--config",
                              str(cfg)], capture_output=True, text=True, timeout=120)
    assert run.returncode == status, run.stderr
    assert "Traceback" not in run.stderr and "not-the-pin" not in run.stderr


def test_install_script_writes_a_unit_that_verifies(tmp_path: Path) -> None:
    """deploy/install.sh into a temporary prefix: a venv with signerd from this
    checkout, the unit with ExecStart at PREFIX/bin/signerd, the config and
    policy templates, and a SoftHSM token with PINs in 0600 files. The unit
    as written passes systemd-analyze verify (regression: the shipped unit
    named /usr/local/bin/signerd, which nothing installed); with TLS files
    added, the config passes check-config, token login included."""
    from cryptography.hazmat.primitives import serialization

    from signerd import pki

    tool = systemd_analyze()
    prefix, units, etc, state = (tmp_path / d for d in ("opt", "units", "etc", "state"))
    run = subprocess.run(["sh", str(ROOT / "deploy" / "install.sh"), "--prefix", str(prefix),
                          "--unit-dir", str(units), "--config-dir", str(etc), "--state-dir",
                          str(state), "--no-user", "--softhsm"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    unit = units / "signerd.service"
    shipped = UNIT.read_text()
    assert unit.read_text() == shipped.replace(
        "/opt/signerd/bin/signerd", str(prefix / "bin" / "signerd")).replace(
        "--config /etc/signerd/signerd.toml", f"--config {etc / 'signerd.toml'}")
    assert unit_options(unit.read_text())["ExecStart"] == [
        f"{prefix}/bin/signerd serve --config {etc}/signerd.toml"]
    verify = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    for pin in ("online.pin", "online.so-pin"):
        assert (etc / pin).stat().st_mode & 0o777 == 0o600
        assert (etc / pin).read_text() not in run.stdout + run.stderr
    # the operator's part: TLS files, and (outside /var) the audit log and socket
    ca = pki.make_ca("install test CA")
    (etc / "tls").mkdir()
    pki.issue(ca, "localhost", server=True, dns=("localhost",)).write(
        etc / "tls" / "server.pem", etc / "tls" / "server-key.pem")
    (etc / "tls" / "client-ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    config = (etc / "signerd.toml").read_text()
    config = config.replace("/var/log/signerd", str(tmp_path / "log")).replace(
        "/run/signerd", str(tmp_path / "run"))
    (etc / "signerd.toml").write_text(config)
    (tmp_path / "log").mkdir()
    (tmp_path / "run").mkdir()
    check = subprocess.run([str(prefix / "bin" / "signerd"), "check-config", "--config",
                            str(etc / "signerd.toml")], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok: token online: " in check.stdout, check.stdout
    # a second run keeps the config, the PINs and the token
    pin = (etc / "online.pin").read_text()
    again = subprocess.run(["sh", str(ROOT / "deploy" / "install.sh"), "--prefix", str(prefix),
                            "--unit-dir", str(units), "--config-dir", str(etc), "--state-dir",
                            str(state), "--no-user", "--softhsm"],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHON": sys.executable})
    assert again.returncode == 0, again.stderr
    assert (etc / "online.pin").read_text() == pin and (etc / "signerd.toml").read_text() == config
