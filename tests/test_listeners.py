"""Every listener bounds what an unauthenticated peer can hold ("Hardening,
round 3", section 1): the metrics listener's read timeout and connection cap,
the Unix relay's private listener, the mTLS port under held connections, the
file-descriptor budget, and deploy/nftables/signerd.nft.

Each test runs a real daemon (real SoftHSM, real mTLS) and real sockets on
loopback; none is timed beyond generous bounds. The figures are bench/hostile.py's.
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from signerd import fdbudget
from signerd.client import Client, ClientConfig
from signerd.config import ConfigError, parse_config
from tests.conftest import (
    HSM,
    PKI,
    Daemon,
    daemon_config,
    spawn_daemon,
    start_daemon,
    unique_gun,
    write_toml,
)
from tests.test_deploy import tool

ROOT = Path(__file__).resolve().parent.parent
NFT = ROOT / "deploy" / "nftables" / "signerd.nft"
@pytest.fixture
def started(hsm: HSM, certs: PKI, tmp_path: Path) -> Iterator[Any]:
    """start(server=..., metrics=...): a daemon with these [server] and
    [metrics] settings (metrics listens on a free loopback port)."""
    daemons: list[Daemon] = []

    def start(server: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
              **kwargs: Any) -> Daemon:
        workdir = tmp_path / f"d{len(daemons)}"
        cfg = daemon_config(hsm, certs, workdir, server=server, metrics=True, **kwargs)
        cfg["metrics"].update(metrics or {})
        d = start_daemon(cfg, certs, workdir)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop()


def slow(port: int) -> socket.socket:
    """A connection that starts a request and never finishes it."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x")
    return s


def wait_for(condition: Any, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def get(port: int, path: str, timeout: float = 10) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return int(r.status)


def connect_all(port: int, count: int, seconds: float = 60.0) -> list[socket.socket]:
    """``count`` connections to ``port``, made all at once: connects the full accept queue
    drops wait out their SYN retransmits together instead of one after another."""
    socks = []
    with selectors.DefaultSelector() as sel:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            assert s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            sel.register(s, selectors.EVENT_WRITE)
        end = time.monotonic() + seconds
        while sel.get_map():
            assert time.monotonic() < end, f"{len(sel.get_map())} connection(s) not made"
            for key, _ in sel.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sel.unregister(sock)
    for s in socks:
        s.setblocking(True)
    return socks


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


# -- the metrics and probe listener ---------------------------------------------


def test_a_slow_metrics_connection_is_closed_after_the_read_timeout(started: Any) -> None:
    """Regression: a connection that sent half a request stayed open, with
    a thread of its own, for as long as the peer liked."""
    d = started(metrics={"read_timeout": 1.0})
    port = d.servers.http.port
    s = slow(port)
    s.settimeout(15)
    start = time.monotonic()
    assert s.recv(1) == b""  # closed unanswered
    assert 0.8 < time.monotonic() - start < 8
    s.close()
    assert get(port, "/livez") == 200


def test_the_metrics_connection_cap_holds_and_frees(started: Any) -> None:
    d = started(metrics={"max_connections": 4, "read_timeout": 30.0})
    http = d.servers.http
    held = [slow(http.port) for _ in range(4)]
    wait_for(lambda: http.open == 4)
    # A fifth waits in the kernel's backlog: not accepted, not answered...
    fifth = socket.create_connection(("127.0.0.1", http.port))
    fifth.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    fifth.settimeout(1.0)
    with pytest.raises(TimeoutError):
        fifth.recv(1)
    assert http.open == 4
    # ...until one of the four goes: then it is answered.
    held.pop().close()
    fifth.settimeout(10)
    assert fifth.recv(12).startswith(b"HTTP/1.1 200")
    for s in (*held, fifth):
        s.close()
    wait_for(lambda: http.open == 0)


def test_held_metrics_connections_cost_no_thread_and_sign_goes_on(started: Any) -> None:
    """Regression: 4,000 slow connections made 4,016 threads and 185 MB, and
    another identity's Sign then failed with DEADLINE_EXCEEDED."""
    d = started(metrics={"max_connections": 64})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw").key_id
    before = threads()
    # 64 held by the daemon, the rest in its backlog
    hostile = connect_all(d.servers.http.port, 300)
    for s in hostile:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
    wait_for(lambda: d.servers.http.open == 64)
    assert threads() <= before + 2  # at most the answering pool's threads
    with d.client() as c:  # a fresh connection of another identity
        assert c.sign(key, b"payload").signature
    for s in hostile:
        s.close()


# -- the Unix socket relay ----------------------------------------------------------


def test_the_relay_listens_on_a_private_socket_no_other_user_reaches(
        started: Any, tmp_path: Path) -> None:
    """Regression: the relay's internal listener was plaintext TCP on
    127.0.0.1:<random>, found with `ss -ltn`; a local user who may not open
    the Unix socket held 1,100 connections to it and every Unix client got
    UNAVAILABLE. It is now a Unix socket in a 0700 directory."""
    d = started(server={"unix_socket": str(tmp_path / "s.sock")})
    relay = d.servers.relay
    assert relay is not None and "unix-relay" not in d.servers.ports
    assert relay.internal.startswith("unix:")
    private = relay.private
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert private.stat().st_uid == os.getuid()
    # Another user cannot connect to it (nor see it: the directory is closed).
    setpriv = tool("setpriv", "util-linux")
    script = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n")
    other = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         script, relay.internal.removeprefix("unix:")], capture_output=True, timeout=60)
    assert other.returncode == 3, other.stderr
    # The Unix socket still names its caller by uid.
    with d.unix_client() as c:
        assert c.create_key(unique_gun(), "targets", purpose="raw").key_id
    lines = (d.workdir / "audit.log").read_text().splitlines()
    assert any(f'"identity": "uid:{os.getuid()}"' in line or
               f'"identity":"uid:{os.getuid()}"' in line for line in lines)
    d.stop()
    assert not private.exists()  # removed at stop


def test_the_unix_socket_connection_cap_holds_and_frees(started: Any, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    started(server={"unix_socket": str(path), "max_unix_connections": 16})
    held = []
    for _ in range(16):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        held.append(s)
    extra = socket.socket(socket.AF_UNIX)
    extra.connect(str(path))
    extra.settimeout(10)
    assert extra.recv(1) == b""  # past the cap: closed at once
    extra.close()
    for s in held:
        s.close()
    # The relay frees their slots as it sees them close; then it serves again.
    def serves() -> bool:
        try:
            with Client(ClientConfig(f"unix:{path}", timeout=20)) as c:
                return bool(c.create_key(unique_gun(), "targets", purpose="raw").key_id)
        except grpc.RpcError:
            return False

    wait_for(serves, 20)


# -- the mTLS port ---------------------------------------------------------------------


def test_with_raw_connections_held_an_authorised_sign_still_succeeds(started: Any) -> None:
    """Below the cap, unauthenticated connections that never speak cost a
    runner nothing; at the cap, new ones are closed at once (see
    test_security.test_connections_that_never_speak_are_closed)."""
    d = started(server={"max_connections": 200, "handshake_timeout": 30.0})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw").key_id
    hostile = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(150)]
    for _ in range(3):
        with d.client() as c:  # a new connection each time
            assert c.sign(key, b"payload").signature
    for s in hostile:
        s.close()


# -- the file-descriptor budget --------------------------------------------------------


def test_caps_that_fit_are_kept_and_others_scaled_to_their_share() -> None:
    wanted = {"tcp": 1000, "unix": 256, "metrics": 64}
    roomy = fdbudget.plan(65536, tokens=2, audit=True, wanted=wanted)
    assert (roomy.tcp, roomy.unix, roomy.metrics) == (1000, 256, 64)
    tight = fdbudget.plan(1024, tokens=1, audit=True, wanted=wanted)
    reserved = fdbudget.RESERVED_BASE + fdbudget.RESERVED_PER_TOKEN + fdbudget.RESERVED_AUDIT
    assert tight.reserved == reserved
    spent = tight.tcp + 3 * tight.unix + tight.metrics
    assert spent <= 1024 - reserved  # the reserve is never handed out
    assert tight.tcp < 1000 and tight.unix < 256 and tight.metrics < 64
    assert tight.metrics >= fdbudget.MIN_SHARE
    only_tcp = fdbudget.plan(1024, tokens=1, audit=False, wanted={"tcp": 1000})
    assert only_tcp.unix == only_tcp.metrics == 0 and only_tcp.tcp <= 1024 - only_tcp.reserved
    with pytest.raises(ConfigError, match="raise LimitNOFILE to at least"):
        fdbudget.plan(200, tokens=1, audit=True, wanted=wanted)


def daemon_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_the_daemon_raises_its_soft_limit_and_refuses_a_limit_too_small(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    prlimit = tool("prlimit", "util-linux")
    cfg = daemon_config(hsm, certs, tmp_path, metrics=True,
                        server={"unix_socket": str(tmp_path / "s.sock")})
    path = write_toml(tmp_path / "signerd.toml", cfg)
    # A default systemd service: soft 1,024, a higher hard limit.
    proc = spawn_daemon(path, tmp_path, prefix=(prlimit, "--nofile=1024:8192", "--"))
    try:
        assert daemon_limits(proc.proc.pid) == (8192, 8192)
    finally:
        assert proc.stop() == 0
    # A hard limit too small for the listeners: refused at start, saying what to do.
    small = subprocess.run(
        [prlimit, "--nofile=180:180", "--", sys.executable, "-m", "signerd.daemon", "serve",
         "--config", str(path)], capture_output=True, timeout=120, text=True)
    assert small.returncode == 2
    assert "raise LimitNOFILE to at least" in small.stderr


def test_the_new_caps_are_bounded_at_config_load() -> None:
    base = {"tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t",
                        "pin_env": "P"}]}
    cases = [({"server": {"max_unix_connections": 0}}, "server.max_unix_connections"),
             ({"server": {"max_connections": 1 << 21}}, "server.max_connections"),
             ({"metrics": {"max_connections": 0}}, "metrics.max_connections"),
             ({"metrics": {"read_timeout": 0}}, "metrics.read_timeout"),
             ({"metrics": {"read_timeout": 301}}, "metrics.read_timeout")]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({**base, **extra}, Path("/"))
    cfg = parse_config({**base, "metrics": {"listen": "127.0.0.1:0", "read_timeout": 2,
                                            "max_connections": 8}}, Path("/"))
    assert (cfg.metrics_read_timeout, cfg.metrics_max_connections) == (2.0, 8)


# -- deploy/ -----------------------------------------------------------------------------


def test_the_unit_sets_an_open_file_limit() -> None:
    text = (ROOT / "deploy" / "systemd" / "signerd.service").read_text()
    values = [line.split("=", 1)[1] for line in text.splitlines()
              if line.startswith("LimitNOFILE=")]
    assert values and int(values[0]) >= 16384


def test_the_nftables_snippet_parses() -> None:
    """`nft -c -f` checks the file without loading it; it needs CAP_NET_ADMIN,
    so an unprivileged run takes it in a user and network namespace of its own."""
    nft = tool("nft", "nftables")
    cmd = [nft, "-c", "-f", str(NFT)]
    if os.geteuid() != 0:
        unshare = shutil.which("unshare")
        assert unshare is not None, "unshare (util-linux) is required"
        cmd = [unshare, "-rn", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = NFT.read_text()
    assert "ct count over" in text and "limit rate over" in text
