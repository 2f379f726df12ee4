"""Performance features: ``[server] workers = N`` and the ctypes key listing.

The benchmark itself is not a timed test (see tests/test_bench.py); these
check that what it relies on is correct.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench import _proc
from signerd import audit, signing
from signerd.config import load_config, parse_config
from signerd.daemon import _workers
from signerd.errors import ConfigError
from signerd.keys import parse_algorithm
from signerd.token import Token
from signerd.v1 import signer_pb2 as pb
from signerd.v1 import signer_pb2_grpc as pb_grpc
from tests.conftest import (
    HSM,
    PKI,
    Process,
    daemon_config,
    hsm_token,
    spawn_daemon,
    threads_taking_signals,
    unique_gun,
    write_toml,
)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _wait_gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _stub(certs: PKI, port: int) -> tuple[grpc.Channel, Any]:
    """A stub on a connection of its own. Channels with equal arguments
    share one connection by default, which would always reach one worker."""
    cert, key = certs.files["admin"]
    creds = grpc.ssl_channel_credentials(certs.ca_file.read_bytes(), key.read_bytes(),
                                         cert.read_bytes())
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost"),
                                      ("grpc.use_local_subchannel_pool", 1)])
    return ch, pb_grpc.SignerServiceStub(ch)


def _signs(path: Path) -> int:
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(1 for r in lines if r["operation"] == "sign" and r["status"] == "OK")


def _spawn_workers(hsm: HSM, certs: PKI, workdir: Path, **server: Any) -> Process:
    cfg = daemon_config(hsm, certs, workdir, server={"workers": 2, **server}, tokens=("online",))
    return spawn_daemon(write_toml(workdir / "signerd.toml", cfg), workdir)


def _cpus_of_threads(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of ``pid``."""
    return {status["Cpus_allowed_list"] for _, status in _proc.thread_statuses(pid)}


def test_cpu_affinity_spread_pins_each_worker_to_its_own_cpu(
    hsm: HSM, certs: PKI, tmp_path: Path
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    proc = _spawn_workers(hsm, certs, tmp_path, cpu_affinity="spread")
    try:
        workers: list[int] = proc.info["workers"]
        for index, pid in enumerate(workers, start=1):  # every thread, gRPC's included
            assert _cpus_of_threads(pid) == {str(cpus[(index - 1) % len(cpus)])}
        if len(cpus) > 1:  # the supervisor itself stays unpinned
            assert _cpus_of_threads(proc.info["pid"]) != {str(cpus[0])}
        ch, stub = _stub(certs, proc.info["tcp"])
        with ch:
            key = stub.CreateKey(pb.CreateKeyRequest(gun=unique_gun(), role="targets",
                                                     purpose=pb.KEY_PURPOSE_RAW))
            resp = stub.Sign(pb.SignRequest(key_id=key.key_id, message=b"pinned"), timeout=20)
        signing.verify(key.public_key_der, parse_algorithm(key.algorithm), resp.signature,
                       b"pinned", signing.SignOptions())
    finally:
        assert proc.stop(signal.SIGTERM) == 0


def test_cpu_affinity_spread_pins_a_single_process_daemon(
    hsm: HSM, certs: PKI, tmp_path: Path
) -> None:
    cfg = daemon_config(hsm, certs, tmp_path, server={"cpu_affinity": "spread"},
                        tokens=("online",))
    proc = spawn_daemon(write_toml(tmp_path / "signerd.toml", cfg), tmp_path)
    try:
        assert _cpus_of_threads(proc.info["pid"]) == {str(min(os.sched_getaffinity(0)))}
        assert '"pinned to one CPU"' in proc.log()
    finally:
        assert proc.stop(signal.SIGTERM) == 0


def test_cpu_affinity_must_be_none_or_spread(tmp_path: Path) -> None:
    raw = {"server": {"cpu_affinity": "all"},
           "tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t", "pin_file": "p"}]}
    with pytest.raises(ConfigError, match=r"server.cpu_affinity must be one of \['none', "
                                          r"'spread'\], not 'all'"):
        parse_config(raw, tmp_path)


def test_two_workers_share_the_port_and_stop_cleanly_on_sigterm(
    hsm: HSM, certs: PKI, tmp_path: Path
) -> None:
    proc = _spawn_workers(hsm, certs, tmp_path)
    workers: list[int] = proc.info["workers"]
    try:
        assert len(workers) == 2 and proc.info["pid"] not in workers
        ch, stub = _stub(certs, proc.info["tcp"])
        with ch:
            key = stub.CreateKey(pb.CreateKeyRequest(gun=unique_gun(), role="targets",
                                                     purpose=pb.KEY_PURPOSE_RAW))
        logs = [tmp_path / "audit.log.w1", tmp_path / "audit.log.w2"]
        message = b"signed by either worker"
        for _ in range(60):  # new connections until the kernel has used both workers
            ch, stub = _stub(certs, proc.info["tcp"])
            with ch:
                resp = stub.Sign(pb.SignRequest(key_id=key.key_id, message=message), timeout=20)
            signing.verify(key.public_key_der, parse_algorithm(key.algorithm), resp.signature,
                           message, signing.SignOptions())
            if all(_signs(p) for p in logs):
                break
        assert [bool(_signs(p)) for p in logs] == [True, True]
        assert [threads_taking_signals(w) for w in workers] == [[], []]
        assert not (tmp_path / "audit.log").exists()  # one chain per worker, no shared file

        os.kill(proc.info["pid"], signal.SIGHUP)  # forwarded: every worker reloads its policy
        deadline = time.monotonic() + 10
        while proc.log().count('"policy reloaded"') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        reloads = [json.loads(line) for line in proc.log().splitlines()
                   if '"policy reloaded"' in line]
        assert sorted(r["worker"] for r in reloads) == [1, 2]
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0
    assert _wait_gone(workers)
    for p in logs:  # each worker closed its own chain properly
        result = audit.verify(p)
        assert result.ok, result


def test_workers_exit_when_the_supervisor_is_killed(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed supervisor leaves no worker holding the port."""
    proc = _spawn_workers(hsm, certs, tmp_path)
    workers: list[int] = proc.info["workers"]
    proc.stop(signal.SIGKILL)
    assert _wait_gone(workers)


def test_supervisor_stops_when_a_worker_dies(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    proc = _spawn_workers(hsm, certs, tmp_path)
    workers: list[int] = proc.info["workers"]
    os.kill(workers[0], signal.SIGKILL)
    assert proc.proc.wait(30) == 1
    assert _wait_gone(workers)
    assert "a worker exited" in proc.log()


@pytest.fixture
def online_token(hsm: HSM) -> Any:
    token = Token(hsm_token(hsm, "online"))
    yield token
    token.close()


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"])
def test_key_listing_reads_back_what_generate_made(online_token: Token, algorithm: str) -> None:
    """The ctypes listing (CKA_ID, CKA_LABEL, key material) rebuilds the same
    entries as generation did, including a label longer than its first buffer."""
    long_gun = "docker.io/" + "/".join(["long-repository-name"] * 11)  # a 240-byte label
    made = online_token.generate(parse_algorithm(algorithm), long_gun, "targets")
    online_token.refresh()
    assert online_token.get(made.key_id) == made


def test_worker_config_gives_each_worker_its_chain_and_only_worker_1_the_socket(
    tmp_path: Path,
) -> None:
    config = parse_config({
        "server": {"listen": "127.0.0.1:0", "workers": 3, "unix_socket": "s.sock"},
        "audit": {"file": "audit.log"},
        "tokens": [{"name": "t", "module": "m.so", "uri": "pkcs11:token=t", "pin_env": "P"}],
    }, tmp_path)
    one = _workers.worker_config(config, 1, "127.0.0.1:4321")
    two = _workers.worker_config(config, 2, "127.0.0.1:4321")
    assert (one.listen, one.workers, one.audit_file, one.unix_socket) == (
        "127.0.0.1:4321", 1, tmp_path / "audit.log.w1", tmp_path / "s.sock")
    assert (two.audit_file, two.unix_socket) == (tmp_path / "audit.log.w2", None)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_port_zero_is_chosen_once_for_all_workers(listen: str) -> None:
    sock, chosen = _workers._reserve(listen)
    assert sock is not None
    try:
        port = int(chosen.rpartition(":")[2])
        assert port > 0 and chosen.startswith(listen[:-1])
    finally:
        sock.close()
    assert _workers._reserve("127.0.0.1:4443") == (None, "127.0.0.1:4443")
    with pytest.raises(ConfigError, match="host:port"):
        _workers._reserve("no-port")


def test_supervisor_runs_workers_and_stops_them(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """The supervisor in this process (its workers are real processes)."""
    path = write_toml(tmp_path / "signerd.toml", daemon_config(
        hsm, certs, tmp_path, server={"workers": 2}, tokens=("online",)))
    sup = _workers.Supervisor(path, load_config(path), ["--log-level", "warning"])
    ready = tmp_path / "ready.json"
    seen: dict[str, Any] = {}

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.update(json.loads(ready.read_text()))
        sup.stop.set()

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    threading.Thread(target=stop_when_ready, daemon=True).start()
    try:
        assert sup.run(ready) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert seen["pid"] == os.getpid() and len(seen["workers"]) == 2
    assert seen["tokens"] == ["online"]
    assert all(p.returncode == 0 for p in sup.procs)


def test_close_waits_for_a_session_in_use(hsm: HSM) -> None:
    """Closing a session, or finalising the module, under a thread that is
    still inside the module is undefined behaviour: close() waits for it."""
    token = Token(hsm_token(hsm, "online"))
    token.keys()  # the first listing is done
    held, release = threading.Event(), threading.Event()

    def borrower() -> None:
        with token.session():
            held.set()
            release.wait(30)

    user = threading.Thread(target=borrower)
    user.start()
    assert held.wait(30)
    closer = threading.Thread(target=token.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # still waiting for the borrowed session
    release.set()
    closer.join(30)
    user.join(30)
    assert not closer.is_alive() and not token.connected


def test_a_closed_token_never_logs_in_again(hsm: HSM) -> None:
    """A health probe that runs into a closed token must not reconnect (and log
    in again, holding sessions of a module that is being finalised)."""
    token = Token(hsm_token(hsm, "online"))
    token.keys()
    token.close()
    assert token.check() is False
    assert not token.connected
