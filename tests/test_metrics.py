"""Prometheus metrics and HTTP health, scraped with a real HTTP client and
parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from signerd.config import ConfigError, parse_config
from signerd.errors import Unavailable
from tests.conftest import Daemon, rpc_error, unique_gun


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def delta(before: dict[Any, float], after: dict[Any, float], name: str,
          **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture
def metered(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory(metrics=True)
    assert d.servers.http is not None
    return d


def test_counters_move_by_exactly_what_was_sent(metered: Daemon) -> None:
    port = metered.servers.http.port  # type: ignore[union-attr]
    with metered.client() as c:
        key = c.create_key(unique_gun(), "targets", "ecdsa-p256", purpose="raw")
        before = scrape(port)
        for _ in range(5):
            c.sign(key.key_id, message=b"m")
        rpc_error(lambda: c.get_key("ab" * 32))  # NOT_FOUND
    with metered.client("nobody") as c:
        # denied, and NOT_FOUND: nobody may not even read the key
        rpc_error(lambda: c.sign(key.key_id, message=b"m"))
        rpc_error(lambda: c.sign(key.key_id, message=b"m"))
    metered.servers.service.check()  # what the health probe runs every health_interval
    after = scrape(port)
    service = "signerd.v1.SignerService"
    assert delta(before, after, "signerd_requests_total", service=service, method="Sign",
                 code="OK") == 5
    assert delta(before, after, "signerd_requests_total", service=service, method="Sign",
                 code="NOT_FOUND") == 2
    assert delta(before, after, "signerd_requests_total", service=service, method="GetKey",
                 code="NOT_FOUND") == 1
    assert delta(before, after, "signerd_request_duration_seconds_count", method="Sign") == 7
    assert delta(before, after, "signerd_signatures_total", algorithm="ecdsa-p256",
                 token="online") == 5
    assert delta(before, after, "signerd_policy_denials_total", operation="sign") == 2
    assert delta(before, after, "signerd_audit_writes_total") == 8
    assert delta(before, after, "signerd_audit_failures_total") == 0
    assert after[("signerd_token_healthy", (("token", "online"),))] == 1
    assert after[("signerd_token_sessions", (("token", "online"),))] == 4
    assert ("signerd_tls_handshake_failures_total", ()) in after
    assert delta(before, after, "signerd_health_probe_duration_seconds_count",
                 token="online") >= 1
    # no key IDs, GUNs or identities as label values
    values = {v for _, labels in after for _, v in labels}
    assert key.key_id not in values and key.gun not in values
    assert not any("spiffe://" in v for v in values)


def test_keys_are_counted_by_token_and_role_kind(metered: Daemon) -> None:
    port = metered.servers.http.port  # type: ignore[union-attr]
    svc = metered.servers.service
    svc.tokens["online"].keys()  # the first listing is over
    svc.export_gauges()  # what the gauges thread does every second
    before = scrape(port)
    with metered.client() as c:
        c.create_key(unique_gun(), "targets/releases", purpose="raw")
        c.create_key(unique_gun(), "snapshot", purpose="raw")
    svc.export_gauges()
    after = scrape(port)
    assert delta(before, after, "signerd_keys", token="online", role="delegation") == 1
    assert delta(before, after, "signerd_keys", token="online", role="snapshot") == 1
    assert delta(before, after, "signerd_keys", token="online", role="root") == 0


def test_livez_and_readyz(metered: Daemon) -> None:
    port = metered.servers.http.port  # type: ignore[union-attr]
    assert get(port, "/livez") == (200, {"status": "serving"})
    assert get(port, "/readyz") == (200, {"status": "ready"})
    assert get(port, "/keys")[0] == 404
    # the listener takes no requests but GET (and HEAD)
    for path in ("/metrics", "/readyz", "/sign"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"x",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405


def test_metrics_listen_is_checked_at_config_load() -> None:
    base = {"tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t",
                        "pin_env": "P"}]}
    for bad in ("9464", "localhost:", "host:99999"):
        with pytest.raises(ConfigError, match="metrics.listen must be HOST:PORT"):
            parse_config({**base, "metrics": {"listen": bad}}, Path("/"))
    with pytest.raises(ConfigError, match=r"unknown keys in \[metrics\]"):
        parse_config({**base, "metrics": {"listen": "127.0.0.1:1", "path": "/m"}}, Path("/"))
    assert parse_config(base, Path("/")).metrics_listen is None


def test_a_taken_metrics_port_stops_the_start(daemon_factory: Any) -> None:
    first = daemon_factory("a", metrics=True)
    taken = first.servers.http.port
    # A busy port is Unavailable (exit 3: a retry may find it free; issue 21 §5),
    # named as the OS names it, with the address once.
    with pytest.raises(Unavailable, match=f"cannot listen on metrics.listen 127.0.0.1:{taken}: "
                                          "Address already in use$"):
        daemon_factory("b", metrics_listen=f"127.0.0.1:{taken}")


def test_unknown_methods_are_not_counted_as_answered(metered: Daemon) -> None:
    port = metered.servers.http.port  # type: ignore[union-attr]
    before = scrape(port)
    with metered.client() as c:
        call = c.channel.unary_unary("/signerd.v1.SignerService/Nope")
        err = rpc_error(lambda: call(b""))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    after = scrape(port)
    assert not any(k[0] == "signerd_requests_total" and ("method", "Nope") in k[1]
                   for k in after)
    assert before.keys() <= after.keys()


def test_core_log_lines_become_json_and_handshake_failures_are_counted() -> None:
    from prometheus_client import REGISTRY

    from signerd.daemon import _corelog

    def failures() -> float:
        return REGISTRY.get_sample_value("signerd_tls_handshake_failures_total") or 0.0

    before = failures()
    ours = b'{"time":"x","level":"info","msg":"signerd serving"}\n'
    assert _corelog.translate(ours) == ours
    line = json.loads(_corelog.translate(
        b"I1201 03:26:08.792344   31394 ssl_transport_security.cc:2563] Handshake failed with "
        b"error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
        b"PEER_DID_NOT_RETURN_A_CERTIFICATE\n"))
    assert line["msg"] == "tls handshake failed" and line["logger"] == "grpc"
    assert line["reason"].startswith("with error SSL_ERROR_SSL")
    assert line["source"] == "ssl_transport_security.cc:2563"
    assert failures() == before + 1
    other = json.loads(_corelog.translate(b"E1201 03:26:08.1 7 chttp2_transport.cc:1] x\xff\n"))
    assert (other["level"], other["msg"]) == ("error", "x\ufffd")
    assert json.loads(_corelog.translate(b"plain words\n"))["msg"] == "plain words"
    assert len(json.loads(_corelog.translate(b"y" * 5000))["msg"]) == 500
    # signerd sets GRPC_VERBOSITY=INFO on purpose: gRPC's warning about it is dropped
    assert _corelog.translate(
        b"W1201 10:10:14.826000 22596 log.cc:102] Log level INFO is not suitable for "
        b"production. Prefer WARNING or ERROR.\n") == b""
    # a server name the client asked for and the certificate lacks: the client's mistake
    misnamed = json.loads(_corelog.translate(
        b"E1201 10:10:26.457000 22596 ssl_transport_security.cc:3238] No match found for "
        b"server name: wrong.example\n"))
    assert misnamed["level"] == "warning" and misnamed["msg"].endswith("wrong.example")


@pytest.mark.parametrize("workers", [1, 2])
def test_one_scrape_counts_every_worker(hsm: Any, certs: Any, tmp_path: Path,
                                        workers: int) -> None:
    """A separate daemon: with workers, each counts into its own multiprocess
    file and the supervisor's scrape adds them up."""
    import socket
    import ssl
    import time

    from signerd.client import Client, ClientConfig
    from tests.conftest import daemon_config, spawn_daemon, write_toml

    cfg = daemon_config(hsm, certs, tmp_path, server={"workers": workers}, metrics=True)
    proc = spawn_daemon(write_toml(tmp_path / "signerd.toml", cfg), tmp_path)
    try:
        port, grpc_port = proc.info["metrics"], proc.info["tcp"]
        cert, key = certs.files["admin"]
        signs = 12
        made = None
        for _ in range(signs // 3):  # new connections: the kernel spreads them over workers
            with Client(ClientConfig(f"127.0.0.1:{grpc_port}", certs.ca_file, cert, key,
                                     "localhost", 20)) as c:
                made = made or c.create_key(unique_gun(), "targets", purpose="raw")
                for _ in range(3):
                    c.sign(made.key_id, message=b"m")
        # a TLS handshake without a client certificate
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", grpc_port)) as raw:
            try:  # TLS 1.3: the client may finish first and see the refusal as EOF
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"x")
                    assert tls.recv(1) == b""
            except (ssl.SSLError, ConnectionResetError):
                pass
        deadline = time.monotonic() + 10
        while True:
            after = scrape(port)
            if after.get(("signerd_tls_handshake_failures_total", ()), 0) >= 1 or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ok = ("signerd_requests_total", (("code", "OK"), ("method", "Sign"),
                                         ("service", "signerd.v1.SignerService")))
        assert after[ok] == signs
        assert after[("signerd_signatures_total", (("algorithm", "ecdsa-p256"),
                                                   ("token", "online")))] == signs
        assert after[("signerd_audit_writes_total", ())] == signs + 1
        assert after[("signerd_token_healthy", (("token", "online"),))] == 1
        assert after[("signerd_token_sessions", (("token", "online"),))] == 4 * workers
        assert after[("signerd_tls_handshake_failures_total", ())] >= 1
        assert get(port, "/readyz") == (200, {"status": "ready"})
        assert get(port, "/livez")[0] == 200
    finally:
        assert proc.stop() == 0
    lines = proc.log().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines
    assert any(json.loads(line).get("msg") == "tls handshake failed" for line in lines)
