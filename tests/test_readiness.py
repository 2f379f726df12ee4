"""Health tells the truth (issue 22 §6): /readyz and gRPC health say what a
signature needs, the audit log included, on a real full file system."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signerd import metrics
from signerd.audit import verify
from signerd.server.app import V1_SERVICE, Readiness
from tests._fullfs import small_fs
from tests.conftest import HSM, PKI, daemon_config, start_daemon, unique_gun

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE_EVERY = 0.2  # seconds: server.health_interval of these daemons


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(channel: grpc.Channel) -> list[int]:
    """gRPC health of the whole server and of signerd.v1, as a load balancer asks."""
    stub = health_pb2_grpc.HealthStub(channel)
    return [stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", V1_SERVICE)]


def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_full_disk_under_the_audit_log_makes_the_daemon_not_ready(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression (issue 22 §6): while the audit log could not be written
    (disk full) every Sign failed closed with UNAVAILABLE, yet /readyz
    answered 200 and gRPC health said SERVING. Now both say not ready from
    the first failed write until a write succeeds again, which the health
    loop tries (the daemon gets no requests to try with while not ready),
    recording the gap in the log."""
    with small_fs(tmp_path / "fs", size_kb=512) as fs:
        cfg = daemon_config(hsm, certs, tmp_path / "d", metrics=True, tokens=("online",),
                            server={"health_interval": PROBE_EVERY})
        log = fs.path / "audit.log"
        cfg["audit"] = {"file": str(log)}
        d = start_daemon(cfg, certs, tmp_path / "d")
        try:
            assert d.servers.http is not None
            port = d.servers.http.port
            with d.client() as c:
                key = c.create_key(unique_gun(), "targets", purpose="raw")
                assert c.sign(key.key_id, message=b"before").signature
                assert readyz(port) == (200, {"status": "ready"})
                assert health(c.channel) == [SERVING, SERVING]

                fs.fill()
                # The log's last page may still hold a few lines: sign until it is full.
                for _ in range(64):
                    try:
                        c.sign(key.key_id, message=b"full")
                    except grpc.RpcError as e:
                        err = e
                        break
                else:
                    pytest.fail("the audit log never ran out of space")
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert "audit log cannot be written" in err.details()
                # At once (the failed write flips health), not at the next probe.
                assert health(c.channel) == [NOT_SERVING, NOT_SERVING]
                code, body = readyz(port)
                assert code == 503 and list(body) == ["audit"], body
                assert "No space left on device" in body["audit"]
                assert metrics.not_ready() == {"audit": "not ready (see the worker's log)"}
                time.sleep(3 * PROBE_EVERY)  # probes fail while the disk stays full
                assert readyz(port)[0] == 503
                assert health(c.channel) == [NOT_SERVING, NOT_SERVING]

                fs.free()
                assert until(lambda: readyz(port)[0] == 200), readyz(port)
                assert health(c.channel) == [SERVING, SERVING]
                assert metrics.not_ready() == {}
                assert c.sign(key.key_id, message=b"after").signature
        finally:
            d.stop()
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        resumed = [x for x in lines if x.get("operation") == "audit.resume"]
        assert len(resumed) == 1, lines
        assert "No space left on device" in resumed[0]["failure"]
        assert resumed[0]["failed_since"] <= resumed[0]["time"]
        assert lines[-1]["operation"] == "sign" and lines.index(resumed[0]) < len(lines) - 1
        assert verify(log).ok


def test_readiness_has_a_hook_for_another_part_of_a_signature(daemon_factory: Any) -> None:
    """The watermark store (branch guard) joins readiness through
    Readiness.add; a part that says why it cannot serve makes /readyz 503
    with that reason and gRPC health NOT_SERVING."""
    d = daemon_factory(metrics=True, tokens=("online",))
    port = d.servers.http.port
    readiness: Readiness = d.servers.readiness
    down: list[str] = []
    readiness.add("watermarks", lambda: down[0] if down else None)
    with pytest.raises(ValueError, match="taken"):
        readiness.add("unusable", lambda: None)
    with d.client() as c:
        assert readyz(port) == (200, {"status": "ready"})
        down.append("watermark store unreachable")
        d.servers.update_health()
        assert readyz(port) == (503, {"watermarks": "watermark store unreachable"})
        assert health(c.channel) == [NOT_SERVING, NOT_SERVING]
        down.clear()
        d.servers.update_health()
        assert readyz(port) == (200, {"status": "ready"})
        assert health(c.channel) == [SERVING, SERVING]


def test_a_supervisors_readyz_says_when_a_workers_audit_log_is_full(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """With workers, the supervisor answers /readyz from its workers'
    signerd_ready gauges: a worker whose audit log cannot be written makes
    the whole daemon not ready until that worker writes again."""
    from signerd.client import Client, ClientConfig
    from tests.conftest import spawn_daemon, write_toml

    with small_fs(tmp_path / "fs", size_kb=512) as fs:
        cfg = daemon_config(hsm, certs, tmp_path / "d", metrics=True, tokens=("online",),
                            server={"workers": 2, "health_interval": PROBE_EVERY})
        cfg["audit"] = {"file": str(fs.path / "audit.log")}
        proc = spawn_daemon(write_toml(tmp_path / "d" / "signerd.toml", cfg), tmp_path / "d")
        try:
            port = proc.info["metrics"]
            cert, key = certs.files["admin"]
            client = ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                                  "localhost", timeout=20)
            assert until(lambda: readyz(port) == (200, {"status": "ready"}))
            with Client(client) as c:
                key_id = c.create_key(unique_gun(), "targets", purpose="raw").key_id
                fs.fill()
                for _ in range(128):  # either worker answers; sign until one's log is full
                    try:
                        c.sign(key_id, message=b"full")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.UNAVAILABLE
                        break
                else:
                    pytest.fail("no worker's audit log ran out of space")
            assert until(lambda: readyz(port)[0] == 503, timeout=5), readyz(port)
            assert readyz(port) == (503, {"audit": "not ready (see the worker's log)"})
            fs.free()
            assert until(lambda: readyz(port) == (200, {"status": "ready"})), readyz(port)
        finally:
            assert proc.stop() == 0
