"""signerd as notary-signer: the proto.KeyManagement and proto.Signer services.

The client is generated from the same proto as notary's (package ``proto``)
and talks to a real daemon over real mutual TLS. Signatures are checked the
way notary-server checks them (tuf/signed/verifiers.go), written out here
with ``cryptography`` rather than through signerd's own helpers, and key IDs
are recomputed the way notary does (tuf/data/keys.go, TUFKey.ID).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from signerd import pki
from signerd.canonicaljson import encode_canonical
from signerd.client import channel
from signerd.config import load_config
from signerd.notary import signer_pb2 as pb
from signerd.notary import signer_pb2_grpc as pb_grpc
from signerd.policy import Identity, Policy, Request
from signerd.server.notary import NOTARY_ALGORITHMS
from tests.conftest import ADMIN, PKI, Daemon, rpc_error, unique_gun
from tests.test_core import token_dir

NOTARY = "spiffe://test/notary-server"
HEALTH_NAMES = ("grpc.health.v1.Health.KeyManagement", "grpc.health.v1.Health.Signer")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "notary"

# notary-server's identity may create, read and sign timestamp and snapshot
# keys only (as in examples/notary/policy.toml); the admin may do anything.
NOTARY_POLICY = f"""
[[rule]]
name = "notary-server"
identities = ["{NOTARY}"]
operations = ["create", "read", "sign"]
roles = ["timestamp", "snapshot"]
tokens = ["online"]
transports = ["tcp"]

[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["*"]
roles = ["*", "root"]
"""

SIG_METHODS = {"ecdsa": "ecdsa", "rsa": "rsapss", "ed25519": "eddsa"}


# -- notary's side of the wire, re-implemented from its source ----------------

def notary_key_id(keytype: str, public: bytes) -> str:
    """TUFKey.ID(): SHA-256 of the canonical JSON {keytype, keyval{private: null, public}}."""
    doc = {"keytype": keytype, "keyval": {"private": None,
                                          "public": base64.b64encode(public).decode()}}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def notary_verify(keytype: str, public: bytes, method: str, sig: bytes, msg: bytes) -> None:
    """tuf/signed/verifiers.go: pick the verifier by method; raise InvalidSignature."""
    if method == "ecdsa":  # ECDSAVerifier
        assert keytype == "ecdsa"
        key = serialization.load_der_public_key(public)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        # Only raw r||s of exactly 2 * ceil(bits / 8) bytes; DER is refused.
        if len(sig) != 2 * ((key.curve.key_size + 7) >> 3):
            raise InvalidSignature(f"ECDSA signature of {len(sig)} bytes")
        half = len(sig) // 2
        r, s = int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
        key.verify(utils.encode_dss_signature(r, s), msg, ec.ECDSA(hashes.SHA256()))
    elif method == "rsapss":  # RSAPSSVerifier
        assert keytype == "rsa"
        key = serialization.load_der_public_key(public)
        assert isinstance(key, rsa.RSAPublicKey)
        if key.key_size < 2048 or len(sig) < 256:
            raise InvalidSignature("RSA keys and signatures under 2048 bits are refused")
        key.verify(sig, msg, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                   hashes.SHA256())
    elif method == "eddsa":  # Ed25519Verifier
        assert keytype == "ed25519"
        if len(public) != 32 or len(sig) != 64:
            raise InvalidSignature("ed25519 key or signature of the wrong size")
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(sig, msg)
    else:
        raise InvalidSignature(f"no verifier for method {method!r}")


def _expires(days: int) -> str:
    """Notary's RFC 3339 ``expires``, ``days`` from now (signerd checks the expiry bounds
    of what metadata keys sign: notary-server's own are 14 days and 3 years)."""
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def timestamp_signed(gun: str, version: int = 1) -> bytes:
    """The canonical JSON of a timestamp's "signed" object: what notary-server sends."""
    digest = hashlib.sha256(gun.encode()).hexdigest()
    return encode_canonical({
        "_type": "Timestamp", "expires": _expires(14), "version": version,
        "meta": {"snapshot": {"length": 1234, "hashes": {
            "sha256": base64.b64encode(bytes.fromhex(digest)).decode()}}},
    })


def snapshot_signed(version: int = 1) -> bytes:
    """The canonical JSON of a snapshot's "signed" object, as notary-server sends it."""
    meta = {role: {"length": 100 + i, "hashes": {"sha256": base64.b64encode(
        hashlib.sha256(role.encode()).digest()).decode()}}
        for i, role in enumerate(("root", "targets"))}
    return encode_canonical({"_type": "Snapshot", "version": version,
                             "expires": _expires(3 * 365), "meta": meta})


# -- client and daemon ---------------------------------------------------------

@dataclass
class Notary:
    """What notary-server holds: one channel, three stubs."""

    channel: grpc.Channel
    km: pb_grpc.KeyManagementStub
    signer: pb_grpc.SignerStub
    health: health_pb2_grpc.HealthStub

    def create(self, gun: str, role: str, algorithm: str = "ecdsa") -> pb.PublicKey:
        req = pb.CreateKeyRequest(algorithm=algorithm, gun=gun, role=role)
        return self.km.CreateKey(req, timeout=60)

    def info(self, key_id: str) -> pb.GetKeyInfoResponse:
        return self.km.GetKeyInfo(pb.KeyID(ID=key_id), timeout=20)

    def sign(self, key_id: str, content: bytes) -> pb.Signature:
        return self.signer.Sign(pb.SignatureRequest(keyID=pb.KeyID(ID=key_id), content=content),
                                timeout=20)

    def status(self, name: str) -> int:
        req = health_pb2.HealthCheckRequest(service=name)
        return int(self.health.Check(req, timeout=20).status)


@pytest.fixture(scope="module")
def notary_certs(certs: PKI) -> PKI:
    if "notary-server" not in certs.files:
        certs.add("notary-server",
                  pki.issue(certs.ca, "notary-server", server=False, uris=(NOTARY,)))
    return certs


@pytest.fixture
def daemon(daemon_factory: Any, notary_certs: PKI) -> Daemon:
    d: Daemon = daemon_factory(policy=NOTARY_POLICY)
    return d


@contextmanager
def connect(d: Daemon, who: str = "notary-server") -> Iterator[Notary]:
    """A client holding ``who``'s certificate, as notary-server holds its own."""
    ch = channel(d.client_config(who))
    try:
        yield Notary(ch, pb_grpc.KeyManagementStub(ch), pb_grpc.SignerStub(ch),
                     health_pb2_grpc.HealthStub(ch))
    finally:
        ch.close()


@pytest.fixture
def notary(daemon: Daemon) -> Iterator[Notary]:
    with connect(daemon) as n:
        yield n


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[Notary]:
    with connect(daemon, "admin") as n:
        yield n


def audit_lines(d: Daemon) -> list[dict[str, Any]]:
    """The request lines of ``d``'s audit log: not the daemon's own records
    (``audit.*``: the tree's start, rotations), which name no caller's request."""
    lines = [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]
    return [line for line in lines if not str(line.get("operation", "")).startswith("audit.")]


# -- the wire contract -----------------------------------------------------------

def test_proto_matches_notary_field_numbers_and_method_paths() -> None:
    fields = {m.name: {f.name: f.number for f in m.fields}
              for m in pb.DESCRIPTOR.message_types_by_name.values()}
    assert fields == {
        "CreateKeyRequest": {"algorithm": 1, "gun": 2, "role": 3},
        "KeyInfo": {"keyID": 1, "algorithm": 2},
        "KeyID": {"ID": 1},
        "Algorithm": {"algorithm": 1},
        "GetKeyInfoResponse": {"keyInfo": 1, "publicKey": 2, "role": 3},
        "PublicKey": {"keyInfo": 1, "publicKey": 2},
        "Signature": {"keyInfo": 1, "algorithm": 2, "content": 3},
        "SignatureRequest": {"keyID": 1, "content": 2},
        "Void": {},
    }
    methods = {f"/{s.full_name}/{m.name}": (m.input_type.name, m.output_type.name)
               for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert methods == {
        "/proto.KeyManagement/CreateKey": ("CreateKeyRequest", "PublicKey"),
        "/proto.KeyManagement/DeleteKey": ("KeyID", "Void"),
        "/proto.KeyManagement/GetKeyInfo": ("KeyID", "GetKeyInfoResponse"),
        "/proto.Signer/Sign": ("SignatureRequest", "Signature"),
    }


def test_raw_method_path_answers(daemon: Daemon, notary: Notary) -> None:
    """A call by path alone, as a Go client built from notary's proto makes it."""
    call = notary.channel.unary_unary("/proto.KeyManagement/CreateKey",
                                      request_serializer=pb.CreateKeyRequest.SerializeToString,
                                      response_deserializer=pb.PublicKey.FromString)
    req = pb.CreateKeyRequest(algorithm="ecdsa", gun=unique_gun(), role="timestamp")
    resp = call(req, timeout=60)
    assert resp.keyInfo.algorithm.algorithm == "ecdsa"
    assert notary_key_id("ecdsa", resp.publicKey) == resp.keyInfo.keyID.ID


@pytest.mark.parametrize("algorithm", ["ecdsa", "rsa", "ed25519"])
def test_notary_server_call_sequence(daemon: Daemon, notary: Notary, algorithm: str) -> None:
    """Health, CreateKey for timestamp and snapshot, GetKeyInfo, Sign, verify."""
    # notary-server's "Trust operational" check: both names, every 10 s.
    assert [notary.status(n) for n in HEALTH_NAMES] == [SERVING, SERVING]
    gun = unique_gun()
    created = {role: notary.create(gun, role, algorithm) for role in ("timestamp", "snapshot")}
    assert created["timestamp"].keyInfo.keyID.ID != created["snapshot"].keyInfo.keyID.ID
    for role, pub in created.items():
        kid = pub.keyInfo.keyID.ID
        assert pub.keyInfo.algorithm.algorithm == algorithm
        assert notary_key_id(algorithm, pub.publicKey) == kid  # what notary-server recomputes
        if algorithm == "ed25519":
            assert len(pub.publicKey) == 32  # raw, not SPKI
        else:
            loaded = serialization.load_der_public_key(pub.publicKey)  # DER SPKI
            if algorithm == "ecdsa":
                assert isinstance(loaded, ec.EllipticCurvePublicKey)
                assert loaded.curve.name == "secp256r1"
            else:
                assert isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size == 2048
        info = notary.info(kid)  # GetPrivateKey = GetKeyInfo, before every signature
        assert (info.keyInfo.keyID.ID, info.keyInfo.algorithm.algorithm) == (kid, algorithm)
        assert (info.publicKey, info.role) == (pub.publicKey, role)
        content = timestamp_signed(gun) if role == "timestamp" else snapshot_signed()
        sig = notary.sign(kid, content)
        assert (sig.keyInfo.keyID.ID, sig.keyInfo.algorithm.algorithm) == (kid, algorithm)
        assert sig.algorithm.algorithm == SIG_METHODS[algorithm]
        notary_verify(info.keyInfo.algorithm.algorithm, info.publicKey, sig.algorithm.algorithm,
                      sig.content, content)
        with pytest.raises(InvalidSignature):
            notary_verify(algorithm, info.publicKey, sig.algorithm.algorithm, sig.content,
                          content + b" ")
    lines = [a for a in audit_lines(daemon) if a["identity"] == f"uri:{NOTARY}" and a["gun"] == gun]
    assert [(a["operation"], a["role"], a["status"]) for a in lines] == [
        ("create", "timestamp", "OK"), ("create", "snapshot", "OK"),
        ("read", "timestamp", "OK"), ("sign", "timestamp", "OK"),
        ("read", "snapshot", "OK"), ("sign", "snapshot", "OK"),
    ]


def test_ecdsa_signature_is_raw_64_bytes_and_der_would_fail(notary: Notary) -> None:
    kid = notary.create(unique_gun(), "timestamp").keyInfo.keyID.ID
    public = notary.info(kid).publicKey
    for n in range(20):  # r or s with leading zeros must still give 64 bytes
        content = timestamp_signed("docker.io/x/y", version=n + 1)
        sig = notary.sign(kid, content).content
        assert len(sig) == 64
        notary_verify("ecdsa", public, "ecdsa", sig, content)
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    with pytest.raises(InvalidSignature, match="ECDSA signature of"):
        notary_verify("ecdsa", public, "ecdsa", utils.encode_dss_signature(r, s), content)


def test_rsa_pss_salt_is_32(notary: Notary) -> None:
    kid = notary.create(unique_gun(), "snapshot", "rsa").keyInfo.keyID.ID
    key = serialization.load_der_public_key(notary.info(kid).publicKey)
    assert isinstance(key, rsa.RSAPublicKey)
    content = snapshot_signed()
    sig = notary.sign(kid, content)
    assert sig.algorithm.algorithm == "rsapss" and len(sig.content) == 256
    for salt, ok in ((32, True), (20, False), (222, False)):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
        if ok:
            key.verify(sig.content, content, pss, hashes.SHA256())
        else:
            with pytest.raises(InvalidSignature):
                key.verify(sig.content, content, pss, hashes.SHA256())


def test_ed25519_signs_the_raw_content(notary: Notary) -> None:
    kid = notary.create(unique_gun(), "timestamp", "ed25519").keyInfo.keyID.ID
    content = timestamp_signed("docker.io/x/ed")
    sig = notary.sign(kid, content)
    public = ed25519.Ed25519PublicKey.from_public_bytes(notary.info(kid).publicKey)
    public.verify(sig.content, content)  # pure EdDSA over the message itself
    with pytest.raises(InvalidSignature):
        public.verify(sig.content, hashlib.sha256(content).digest())


# -- notary-signer's key reuse rule ---------------------------------------------

def test_create_key_reuses_a_never_used_key_until_it_signs(daemon: Daemon, notary: Notary) -> None:
    gun = unique_gun()
    first = notary.create(gun, "timestamp").keyInfo.keyID.ID
    assert notary.create(gun, "timestamp").keyInfo.keyID.ID == first
    # Another role, algorithm or GUN is another key.
    others = {notary.create(gun, "snapshot").keyInfo.keyID.ID,
              notary.create(gun, "timestamp", "ed25519").keyInfo.keyID.ID,
              notary.create(unique_gun(), "timestamp").keyInfo.keyID.ID}
    assert first not in others and len(others) == 3
    notary.sign(first, timestamp_signed(gun))
    second = notary.create(gun, "timestamp").keyInfo.keyID.ID
    assert second != first
    assert notary.create(gun, "timestamp").keyInfo.keyID.ID == second
    # The used flag lives on the token (CKA_LABEL): a re-read keeps it.
    svc = daemon.servers.service
    svc.tokens["online"].refresh()
    assert svc.get_key(first).used and not svc.get_key(second).used
    notary.sign(first, timestamp_signed(gun, 2))  # a used key still signs
    assert notary.create(gun, "timestamp").keyInfo.keyID.ID == second


def test_concurrent_create_key_hands_out_one_key(notary: Notary) -> None:
    gun, ids, errors = unique_gun(), [], []

    def create() -> None:
        try:
            ids.append(notary.create(gun, "snapshot").keyInfo.keyID.ID)
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(ids) == 8 and len(set(ids)) == 1


# -- health ------------------------------------------------------------------------

def test_health_names_and_reflection(notary: Notary) -> None:
    assert {n: notary.status(n) for n in HEALTH_NAMES} == dict.fromkeys(HEALTH_NAMES, SERVING)
    r = reflection_pb2_grpc.ServerReflectionStub(notary.channel)
    answers = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=20))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"proto.KeyManagement", "proto.Signer", "signerd.v1.SignerService"} <= names


def test_health_not_serving_while_the_token_is_unusable(
        daemon_factory: Any, notary_certs: PKI, hsm: Any, tmp_path: Path) -> None:
    d: Daemon = daemon_factory(name="unplug", policy=NOTARY_POLICY, tokens=("online",))
    with connect(d) as notary:
        gun = unique_gun()
        kid = notary.create(gun, "timestamp").keyInfo.keyID.ID
        assert [notary.status(n) for n in HEALTH_NAMES] == [SERVING, SERVING]
        where = token_dir(hsm, "test-online")
        away = tmp_path / "unplugged"
        where.rename(away)  # the HSM is unplugged
        try:
            err = rpc_error(lambda: notary.sign(kid, timestamp_signed(gun)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "token online" in err.details()
            assert [notary.status(n) for n in HEALTH_NAMES] == [NOT_SERVING, NOT_SERVING]
        finally:
            away.rename(where)
        time.sleep(1.1)  # reconnect attempts are spaced by a second
        assert d.servers.service.check()  # what the periodic probe runs
        d.servers.update_health()
        assert [notary.status(n) for n in HEALTH_NAMES] == [SERVING, SERVING]
        sig = notary.sign(kid, timestamp_signed(gun))
        notary_verify("ecdsa", notary.info(kid).publicKey, sig.algorithm.algorithm, sig.content,
                      timestamp_signed(gun))


# -- errors --------------------------------------------------------------------------

@pytest.mark.parametrize("key_id", [
    pytest.param("ab" * 32, id="unknown"),
    pytest.param("", id="empty"),
    pytest.param("AB" * 32, id="uppercase"),
    pytest.param("not-a-key-id", id="malformed"),
    pytest.param("a" * 10_000, id="huge"),
])
def test_unknown_key_ids_are_not_found(notary: Notary, admin: Notary, key_id: str) -> None:
    for fn in (lambda: notary.info(key_id), lambda: notary.sign(key_id, b"{}"),
               lambda: admin.km.DeleteKey(pb.KeyID(ID=key_id), timeout=20)):
        err = rpc_error(fn)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert len(err.details()) < 300


@pytest.mark.parametrize("algorithm", ["", "ECDSA", "ecdsa-p256", "rsa-2048", "ecdsa-x509", "dsa"])
def test_bad_algorithm_is_invalid_argument(notary: Notary, algorithm: str) -> None:
    err = rpc_error(lambda: notary.create(unique_gun(), "timestamp", algorithm))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'ecdsa', 'rsa', 'ed25519'" in err.details()


@pytest.mark.parametrize(("gun", "role", "fragment"), [
    pytest.param("", "timestamp", "gun is required", id="empty-gun"),
    pytest.param("docker.io/x/y", "", "role is required", id="empty-role"),
    pytest.param("Docker.io/X Y", "timestamp", "invalid gun", id="bad-gun"),
    pytest.param("docker.io/x/y", "timestamps", "invalid role", id="bad-role"),
])
def test_bad_gun_or_role_is_invalid_argument(notary: Notary, gun: str, role: str,
                                             fragment: str) -> None:
    err = rpc_error(lambda: notary.create(gun, role))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.details()


def test_empty_content_is_invalid_argument(notary: Notary) -> None:
    kid = notary.create(unique_gun(), "timestamp").keyInfo.keyID.ID
    err = rpc_error(lambda: notary.sign(kid, b""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_p384_key_is_refused_because_notary_cannot_verify_it(daemon: Daemon,
                                                             notary: Notary) -> None:
    gun = unique_gun()
    with daemon.client() as c:  # signerd.v1 can make keys the Notary API cannot use
        kid = c.create_key(gun, "timestamp", "ecdsa-p384").key_id
    for fn in (lambda: notary.info(kid), lambda: notary.sign(kid, b"{}")):
        err = rpc_error(fn)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ecdsa-p384" in err.details()
    assert notary.create(gun, "timestamp").keyInfo.keyID.ID != kid  # never reused for "ecdsa"


# -- policy, identity, audit -------------------------------------------------------

def test_policy_limits_notary_server_to_timestamp_and_snapshot(
        daemon: Daemon, notary: Notary, admin: Notary) -> None:
    gun = unique_gun()
    for role in ("targets", "targets/releases", "root"):
        err = rpc_error(lambda role=role: notary.create(gun, role))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert NOTARY in err.details()
    targets = admin.create(gun, "targets").keyInfo.keyID.ID  # the admin may
    for fn in (lambda: notary.info(targets), lambda: notary.sign(targets, b"{}")):
        err = rpc_error(fn)  # it may not read targets keys: as if there were none
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND,
                                               f"no key with ID {targets}")
    # An unused targets key must not leak through CreateKey's reuse rule either.
    err = rpc_error(lambda: notary.create(gun, "targets"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    ts = notary.create(gun, "timestamp").keyInfo.keyID.ID
    err = rpc_error(lambda: notary.km.DeleteKey(pb.KeyID(ID=ts), timeout=20))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # no "delete" for notary-server
    admin.km.DeleteKey(pb.KeyID(ID=ts), timeout=20)
    assert rpc_error(lambda: notary.info(ts)).code() == grpc.StatusCode.NOT_FOUND
    denied = [a for a in audit_lines(daemon)
              if a["identity"] == f"uri:{NOTARY}" and a["gun"] == gun and a["decision"] == "deny"]
    assert {(a["operation"], a["role"]) for a in denied} == {
        ("create", "targets"), ("create", "targets/releases"), ("create", "root"),
        ("read", "targets"), ("sign", "targets"), ("delete", "timestamp"),
    }
    assert all(a["status"] == ("NOT_FOUND" if a["role"] == "targets" and a["operation"] != "create"
                               else "PERMISSION_DENIED") for a in denied)


@pytest.mark.parametrize(("who", "code"), [
    ("nobody", grpc.StatusCode.PERMISSION_DENIED),  # valid certificate, no rule
    ("foreign", grpc.StatusCode.UNAVAILABLE),  # not issued by the client CA: no handshake
])
def test_other_identities_get_nothing(daemon: Daemon, who: str, code: grpc.StatusCode) -> None:
    with connect(daemon, who) as client:
        assert rpc_error(lambda: client.create(unique_gun(), "timestamp")).code() == code


# -- the example configuration -------------------------------------------------------

def test_example_matches_notary_server_config_and_loads() -> None:
    server = json.loads((EXAMPLE / "server.json").read_text())
    trust = server["trust_service"]
    # Field names from notary's cmd/notary-server/config.go; port is a string.
    assert set(trust) == {"type", "hostname", "port", "key_algorithm", "tls_ca_file",
                          "tls_client_cert", "tls_client_key"}
    assert trust["type"] == "remote" and isinstance(trust["port"], str)
    assert trust["key_algorithm"] in NOTARY_ALGORITHMS
    config = load_config(EXAMPLE / "signerd.toml")
    assert config.listen is not None and config.listen.endswith(":" + trust["port"])
    assert config.policy_file == EXAMPLE / "policy.toml"
    assert "DNS:" + trust["hostname"] in (EXAMPLE / "signerd.toml").read_text()
    identity = tomllib.loads((EXAMPLE / "policy.toml").read_text())["rule"][0]["identities"][0]
    policy = Policy.load(config.policy_file)

    def allowed(op: str, role: str, transport: str = "tcp", who: str = identity) -> bool:
        return policy.allows(Request(Identity.parse(who), transport, op, "docker.io/acme/app",
                                     role, "online"))

    assert all(allowed(op, role) for op in ("create", "read", "sign")
               for role in ("timestamp", "snapshot"))
    assert not any(allowed(op, role) for op in ("create", "read", "sign", "delete")
                   for role in ("root", "targets", "targets/releases"))
    assert not allowed("delete", "timestamp")
    assert allowed("delete", "timestamp", "unix", "uid:0")
