"""Findings of an attack session (on main at d0496ca, where each of these failed); they now
guard the fixes.

Real daemon, real mutual TLS, real SoftHSM token, no mocks (tests/conftest.py's daemon).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from securesystemslib.formats import encode_canonical as olpc_canonical

from signerd.canonicaljson import encode_canonical as notary_canonical
from signerd.client import channel
from signerd.notary import signer_pb2 as npb
from signerd.notary import signer_pb2_grpc as npb_grpc
from signerd.v1 import signer_pb2 as pb
from tests._postgres import postgres  # noqa: F401 - the fixture
from tests.conftest import ADMIN, RUNNER, Daemon, unique_gun

NOTARY_ID = "spiffe://test/notary-server"
POLICY = f"""
[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["*", "purpose", "reset"]
roles = ["*", "root"]

[[rule]]
name = "ci-runner"
identities = ["{RUNNER}"]
operations = ["create", "read", "sign"]
roles = ["targets/ci"]
tokens = ["online"]

[[rule]]
name = "notary-server"
identities = ["{NOTARY_ID}"]
operations = ["create", "read", "sign"]
roles = ["timestamp", "snapshot"]
tokens = ["online"]
"""


def _expires(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tuf_targets(version: int = 1, **extra: Any) -> bytes:
    body: dict[str, Any] = {"_type": "targets", "spec_version": "1.0.31", "version": version,
                            "expires": _expires(30), "targets": {}}
    body.update(extra)
    text = olpc_canonical(body)
    assert isinstance(text, str)
    return text.encode()


def _canon_notary(body: dict[str, Any]) -> bytes:
    return notary_canonical(body)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TARGET = {"length": 7, "hashes": {"sha256": _b64(hashlib.sha256(b"malware").digest())}}


@pytest.fixture
def daemon(daemon_factory: Any, certs: Any) -> Daemon:
    from signerd import pki
    if "notary-server" not in certs.files:
        certs.add("notary-server",
                  pki.issue(certs.ca, "notary-server", server=False, uris=(NOTARY_ID,)))
    d: Daemon = daemon_factory(policy=POLICY)
    return d


def _sign(d: Daemon, who: str, key_id: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    with d.client(who) as c:
        try:
            c.stub.Sign(pb.SignRequest(key_id=key_id, message=payload), timeout=20)
        except grpc.RpcError as e:
            return e.code(), e.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _notary_sign(d: Daemon, key_id: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    ch = channel(d.client_config("notary-server"))
    try:
        npb_grpc.SignerStub(ch).Sign(
            npb.SignatureRequest(keyID=npb.KeyID(ID=key_id), content=payload), timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details()  # type: ignore[attr-defined]
    finally:
        ch.close()
    return grpc.StatusCode.OK, ""


# -- Finding 1: a delegated key widens its own delegated paths ---------------------------


@pytest.mark.parametrize("victim_format", ["tuf", "notary"])
def test_a_delegated_key_cannot_widen_its_own_delegation(daemon: Daemon,
                                                         victim_format: str) -> None:
    """The security team's targets key delegates ``ci/`` to ``targets/ci``. The CI runner
    (policy: sign with targets/ci only) signs a TUF targets payload that "delegates" the
    flat TUF name ``ci`` to itself with ``path_hash_prefixes: [""]``: signerd records that
    as the delegation of ``targets/ci`` (any targets payload's delegations overwrite the
    recorded paths of the roles it names), and from then on signs targets outside ``ci/``,
    for a TUF repository and for a Notary one alike."""
    gun = unique_gun()
    with daemon.client("admin") as c:
        parent = c.create_key(gun, "targets", "ecdsa-p256")
    with daemon.client("runner") as c:
        ci = c.create_key(gun, "targets/ci", "ecdsa-p256")
    if victim_format == "tuf":
        top = _tuf_targets(delegations={"keys": {}, "roles": [
            {"name": "ci", "keyids": [], "threshold": 1, "paths": ["ci/*"],
             "terminating": True}]})
        outside = _tuf_targets(2, targets={"release/app": TARGET})
    else:
        top = _canon_notary({"_type": "Targets", "version": 1, "expires": _expires(30),
                       "targets": {}, "delegations": {"keys": {}, "roles": [
                           {"name": "targets/ci", "keyids": [], "threshold": 1,
                            "paths": ["ci/"]}]}})
        outside = _canon_notary({"_type": "Targets", "version": 2, "expires": _expires(30),
                           "targets": {"release/app": TARGET}})
    assert _sign(daemon, "admin", parent.key_id, top)[0] == grpc.StatusCode.OK
    before = _sign(daemon, "runner", ci.key_id, outside)
    assert before[0] == grpc.StatusCode.FAILED_PRECONDITION, before  # the check works...
    self_delegation = _tuf_targets(1, delegations={"keys": {}, "roles": [
        {"name": "ci", "keyids": [], "threshold": 1, "path_hash_prefixes": [""],
         "terminating": False}]})
    widened = _sign(daemon, "runner", ci.key_id, self_delegation)
    after = _sign(daemon, "runner", ci.key_id, outside)
    # ...until the runner's own key rewrites what its parent delegated to it.
    assert after[0] == grpc.StatusCode.FAILED_PRECONDITION, (
        f"targets/ci widened its own paths (self-delegation signed: {widened[0].name}) and "
        f"then signed release/app, outside the ci/ its parent delegated")


# -- Finding 2: keys that Go's JSON decoder folds onto the fields signerd checks -----------

LONG_S = "\u017f"  # 'ſ': Go's encoding/json (and docker/go/canonical/json) matches it to 's'


def _timestamp(version: int, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "_type": "Timestamp", "version": version, "expires": _expires(7),
        "meta": {"snapshot": {"length": 10, "hashes": {
            "sha256": _b64(hashlib.sha256(b"snapshot").digest())}}}}
    body.update(extra)
    return _canon_notary(body)


@pytest.mark.parametrize("field,value", [
    # a timestamp that notary's Go client reads as valid until 2099
    ("expire" + LONG_S, "2099-01-01T00:00:00Z"),
    # a timestamp that notary's Go client reads as version 1 (below the watermark)
    ("ver" + LONG_S + "ion", 1),
])
def test_notary_metadata_with_a_case_folded_twin_of_a_checked_field_is_refused(
        daemon: Daemon, field: str, value: Any) -> None:
    """notary (client and server) decodes ``signed`` with Go's encoding/json rules, which
    match object keys to struct fields case-insensitively with Unicode simple folding:
    ``expireſ`` (U+017F) sets ``Expires``, ``verſion`` sets ``Version``. Canonical JSON
    sorts ``expireſ`` after ``expires``, so Go keeps its value; signerd checks only the
    exact ``expires``/``version`` keys and keeps the twin as an unknown field."""
    gun = unique_gun()
    with daemon.client("notary-server") as c:
        ts = c.create_key(gun, "timestamp", "ecdsa-p256")
    assert _notary_sign(daemon, ts.key_id, _timestamp(5))[0] == grpc.StatusCode.OK
    payload = _timestamp(6, **{field: value})
    assert LONG_S.encode() in payload and payload.index(b'"expires"') >= 0
    code, details = _notary_sign(daemon, ts.key_id, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"signed a timestamp whose {field!r} = {value!r} is what notary's Go decoder reads "
        f"as the checked field ({code.name} {details})")


# -- Finding 3: a version too large for the watermark store --------------------------------


def test_a_huge_version_is_a_client_error_not_an_internal_one(daemon: Daemon) -> None:
    gun = unique_gun()
    with daemon.client("runner") as c:
        ci = c.create_key(gun, "targets/ci", "ecdsa-p256")
    code, details = _sign(daemon, "runner", ci.key_id, _tuf_targets(2 ** 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


# Finding 2, end to end: what notary's own Go client makes of such a timestamp. ------------

from tests import _notary  # noqa: E402
from tests.test_notary_server import _target, server, signerd, tls  # noqa: E402,F401


def test_notary_client_reads_the_folded_twin_signerd_did_not_check(
        signerd: Daemon, server: _notary.NotaryServer, tmp_path: Any) -> None:  # noqa: F811
    """A compromised notary-server asks signerd (content checks on) to sign the next
    timestamp with a valid ``expires`` and an ``expireſ`` twin. The real notary 0.7.0 client,
    given that file, takes ``expireſ`` as the expiry: with a past date it says "Metadata for
    timestamp expired" (the control without the twin lists the tag), so with 2099 it would
    trust a timestamp for 70 years. Likewise ``hasheſ`` replaces the snapshot hashes that
    signerd's freeze check mapped. signerd must refuse to sign either."""
    from signerd.trust.metadata import Envelope, Signature
    _notary.require()
    client = _notary.NotaryClient(tmp_path / "client", server)
    gun = unique_gun("docker.io/notary")
    client.run("init", gun, "-p")
    client.run("add", gun, "v1", str(_target(client, "v1", b"first release")), "-p")
    meta = client.dir / "trust" / "tuf" / gun / "metadata"
    ts = json.loads((meta / "timestamp.json").read_bytes())
    root = json.loads((meta / "root.json").read_bytes())
    (kid,) = root["signed"]["roles"]["timestamp"]["keyids"]
    config = json.loads(client.config.read_text())  # the client works from its cache now
    config["remote_server"]["url"] = "https://127.0.0.1:1"
    client.config.write_text(json.dumps(config))

    def attempt(extra: dict[str, Any]) -> tuple[grpc.StatusCode, str]:
        signed = {**ts["signed"], "version": ts["signed"]["version"] + 1, **extra}
        payload = notary_canonical(signed)
        ch = channel(signerd.client_config("notary-server"))
        try:
            sig = npb_grpc.SignerStub(ch).Sign(npb.SignatureRequest(
                keyID=npb.KeyID(ID=kid), content=payload), timeout=20).content
        except grpc.RpcError as e:
            return e.code(), e.details()  # type: ignore[attr-defined]
        finally:
            ch.close()
        envelope = Envelope(signed, [Signature(kid, ts["signatures"][0]["method"], sig)])
        (meta / "timestamp.json").write_bytes(envelope.to_bytes())
        done = client.run("list", gun, check=False)
        return grpc.StatusCode.OK, f"notary list exit {done.returncode}: " + " ".join(
            line for line in done.stderr.splitlines() if "expired" in line or "fatal" in line)

    control = attempt({})
    assert control[0] == grpc.StatusCode.OK and "exit 0" in control[1], control
    past = attempt({"expire" + LONG_S: "2001-01-01T00:00:00Z"})
    wrong = {"sha256": _b64(b"\0" * 32), "sha512": _b64(b"\0" * 64)}
    snap = ts["signed"]["meta"]["snapshot"]
    # control: wrong hashes alone make the client refuse the cached snapshot
    bad = attempt({"meta": {"snapshot": {**snap, "hashes": wrong}}})
    assert bad[0] == grpc.StatusCode.OK and "exit 0" not in bad[1], bad
    hashes = attempt({"meta": {"snapshot": {**snap, "hashes": wrong,
                                            "hashe" + LONG_S: snap["hashes"]}}})
    assert (past[0], hashes[0]) == (grpc.StatusCode.INVALID_ARGUMENT,) * 2, (
        f"signerd signed them; expireſ in the past -> {past[1]}; real snapshot hashes only "
        f"under hasheſ -> {hashes[1]}")


def test_a_huge_version_does_not_mark_the_postgresql_store_unavailable(
        hsm: Any, certs: Any, postgres: Any, tmp_path: Any) -> None:  # noqa: F811
    """With ``[state] url = postgresql://…`` the same payload (version 2**63, a valid JSON
    integer that no BIGINT holds) is answered UNAVAILABLE and turns the replica's gRPC
    health NOT_SERVING and /readyz 503 ``{"unusable": ["state"]}``: any caller allowed to
    sign with one metadata key can take replicas out of the load balancer at will."""
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import daemon_config, start_daemon
    cfg = daemon_config(hsm, certs, tmp_path / "d", policy=POLICY, metrics=True,
                        server={"health_interval": 30})
    cfg["state"] = {"url": postgres.url}
    d = start_daemon(cfg, certs, tmp_path / "d")
    try:
        gun = unique_gun()
        with d.client("runner") as c:
            ci = c.create_key(gun, "targets/ci", "ecdsa-p256")
        assert _sign(d, "runner", ci.key_id, _tuf_targets(1))[0] == grpc.StatusCode.OK
        code, details = _sign(d, "runner", ci.key_id, _tuf_targets(2 ** 63))
        ch = channel(d.client_config("admin"))
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5).status
        ch.close()
        with socket.create_connection(("127.0.0.1", d.servers.http.port)) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\n\r\n")
            readyz = s.recv(4096)
        assert (code, health) == (grpc.StatusCode.INVALID_ARGUMENT,
                                  health_pb2.HealthCheckResponse.SERVING), (
            code, details, health, readyz.split(b"\r\n\r\n")[-1])
    finally:
        d.stop()


# -- Finding 4: the metrics listener on a request with more than 100 headers ---------------


def test_metrics_listener_answers_a_request_with_many_headers(
        daemon_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An unauthenticated peer's request of 101 short headers (1 KB, under the 8 KiB head
    limit) makes http.client.parse_headers raise HTTPException, which HttpListener._serve
    does not catch: no answer, and each such connection logs an ERROR traceback ("Task
    exception was never retrieved")."""
    import socket
    d = daemon_factory(name="many-headers", policy=POLICY, metrics=True)
    head = b"GET /livez HTTP/1.1\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(101)) + b"\r\n"
    with socket.create_connection(("127.0.0.1", d.servers.http.port), timeout=5) as s:
        s.sendall(head)
        answer = s.recv(4096)
    import gc
    gc.collect()  # asyncio reports an unretrieved task exception when the task is freed
    assert answer.startswith(b"HTTP/1.1 4"), answer
    assert "never retrieved" not in caplog.text
