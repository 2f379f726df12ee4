"""Findings of a second attack session (on main at 0180756, where each of these failed); they
now guard the fixes.

Real daemon, real mutual TLS, real SoftHSM token, no mocks (tests/conftest.py's daemon,
tests/test_attack_findings.py's policy: ``admin``; ``runner`` may create, read and sign
targets/ci keys on the online token; ``nobody`` has no rule at all).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from asn1crypto import algos as asn1algos
from asn1crypto import keys as asn1keys
from asn1crypto import x509 as asn1x509
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import CanonicalJSONSerializer

from signerd.v1 import signer_pb2 as pb
from tests.conftest import Daemon, unique_gun
from tests.test_attack_findings import _sign, _tuf_targets, daemon  # noqa: F401 - fixture

# -- Finding 1: a raw key signs TUF metadata whose canonical form holds a control character ---


def test_a_raw_key_does_not_sign_tuf_metadata_holding_a_newline(daemon: Daemon) -> None:  # noqa: F811 - the fixture
    """A raw key "never signs a payload that is a TUF or Notary signed object". The guard
    recognises metadata with ``json.loads`` in its strict mode, which refuses the raw
    control characters that OLPC canonical JSON (what python-tuf signs) leaves unescaped in
    strings: every ECDSA key's PEM ``public`` value, a target name or custom field with a
    newline. Such a payload is "not metadata" to the raw-key rule, so a raw key signs it with
    no role, expiry, rollback or freeze check, and python-tuf accepts the signature: the bytes
    are exactly its canonical form of that metadata."""
    gun = unique_gun()
    with daemon.client("admin") as c:
        raw = c.create_key(gun, "targets", "ecdsa-p256", purpose="raw")
    plain = _tuf_targets(1)
    assert _sign(daemon, "admin", raw.key_id, plain)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # A TUF targets metadata as python-tuf writes it, with a newline in a custom field (the
    # same holds for a delegation listing an ecdsa key, whose public value is PEM).
    payload = _tuf_targets(1, custom={"note": "line one\nline two"},
                           expires="2099-01-01T00:00:00Z")
    # python-tuf's file escapes the newline; what it signs and verifies does not.
    md = Metadata.from_bytes(json.dumps({"signatures": [], "signed": json.loads(
        payload, strict=False)}).encode())
    assert CanonicalJSONSerializer().serialize(md.signed) == payload  # what TUF verifies
    code, details = _sign(daemon, "admin", raw.key_id, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"raw key {raw.key_id} signed TUF targets metadata expiring in 2099 "
        f"({code.name} {details})")


# -- Finding 2: idle SignStream calls of an identity without any rule shut out everyone ------


def test_idle_streams_of_a_stranger_do_not_shut_signstream_for_others(daemon: Daemon) -> None:  # noqa: F811 - the fixture
    """Open streams are bounded server-wide (half of ``threads``: 8 here) with no bound per
    identity and no idle timeout, and the slot is taken before the policy is asked. An
    identity that the policy grants nothing (``nobody``) opens 8 SignStream calls and sends
    nothing: from then on every other identity's SignStream is refused RESOURCE_EXHAUSTED,
    for as long as the stranger keeps its connection."""
    gun = unique_gun()
    with daemon.client("admin") as c:
        raw = c.create_key(gun, "targets", "ecdsa-p256", purpose="raw")
    stop = threading.Event()

    def silent() -> Iterator[pb.SignRequest]:
        stop.wait(60)
        yield from ()

    stranger = daemon.client("nobody")
    calls = [stranger.stub.SignStream(silent()) for _ in range(8)]
    try:
        time.sleep(2)
        with daemon.client("admin") as c:
            try:
                items = list(c.sign_stream(
                    [pb.SignRequest(key_id=raw.key_id, message=b"hello")], timeout=10))
                outcome = f"items {[i.code for i in items]}"
            except grpc.RpcError as e:
                outcome = f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
        assert outcome == "items [0]", (
            f"the admin's SignStream was refused while 'nobody' held 8 idle streams: {outcome}")
    finally:
        stop.set()
        for call in calls:
            call.cancel()
        stranger.close()


# -- Finding 3: unknown key IDs from a stranger starve everyone's key lookups --------------


def test_unknown_key_ids_of_a_stranger_do_not_starve_a_replicas_new_key(
        daemon: Daemon, daemon_factory: Any) -> None:  # noqa: F811 - the fixture
    """A key ID this process has not listed is searched on the token under one lock per
    token, before the policy is asked. While any process writes the token's objects (here
    the runner creating targets/ci keys, as CI runners do), SoftHSM's generation watch makes
    each miss retry for about a second. ``nobody`` (no rule) sends 14 GetKey calls for IDs
    that do not exist; the admin then signs with a key another daemon on the same token
    just created (a replica's key, which this process finds by a miss): it waits behind the
    stranger's misses for 15 to 20 s (here, 1 ms when no one writes)."""
    other = daemon_factory("replica", policy=daemon.workdir.joinpath("policy.toml").read_text())
    with other.client("admin") as c:
        fresh = c.create_key(unique_gun(), "targets", "ecdsa-p256", purpose="raw")
    stop = threading.Event()

    def writer() -> None:
        with daemon.client("runner") as c:
            while not stop.is_set():
                c.create_key(unique_gun("docker.io/acme"), "targets/ci", "ecdsa-p256")

    def miss(i: int) -> None:
        with daemon.client("nobody") as c:
            try:
                c.stub.GetKey(pb.GetKeyRequest(key_id=f"{i:064x}"), timeout=25)
            except grpc.RpcError:
                pass

    w = threading.Thread(target=writer)
    w.start()
    try:
        time.sleep(1)
        with ThreadPoolExecutor(14) as pool:
            for i in range(1, 15):
                pool.submit(miss, i)
            time.sleep(0.5)
            start = time.monotonic()
            with daemon.client("admin") as c:
                try:
                    c.stub.Sign(pb.SignRequest(key_id=fresh.key_id, message=b"x"), timeout=20)
                    outcome = "OK"
                except grpc.RpcError as e:
                    outcome = e.code().name  # type: ignore[attr-defined]
            took = time.monotonic() - start
    finally:
        stop.set()
        w.join()
    assert outcome == "OK" and took < 5, (
        f"the admin's signature with a replica's new key: {outcome} after {took:.1f}s, "
        "queued behind 'nobody's lookups of unknown key IDs")


# -- Finding 4: a root metadata key signs X.509 assertions beyond its own root certificate ---


def _tbs(spki_der: bytes, cn: str, extensions: list[dict[str, Any]] | None = None) -> bytes:
    now = datetime.now(UTC)
    name = asn1x509.Name.build({"common_name": cn})
    return asn1x509.TbsCertificate({
        "version": "v3", "serial_number": 12345,
        "signature": asn1algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"}),
        "issuer": name, "subject": name,
        "validity": {"not_before": asn1x509.Time({"utc_time": now - timedelta(days=1)}),
                     "not_after": asn1x509.Time({"utc_time": now + timedelta(days=3000)})},
        "subject_public_key_info": asn1keys.PublicKeyInfo.load(spki_der),
        "extensions": extensions,
    }).dump()


def test_a_root_metadata_key_signs_only_a_plain_root_certificate(daemon: Daemon) -> None:  # noqa: F811 - the fixture
    """A root metadata key signs "the TBSCertificate of its own root certificate" (Notary's
    template: CA:false, digitalSignature+keyEncipherment, codeSigning). Only the SPKI, the
    self-issue and the CN are checked, so the root key signs a self-issued certificate that
    says CA:TRUE with keyCertSign, carries SANs naming other identities (signerd's own admin
    SPIFFE ID, a DNS name) and serverAuth/clientAuth, none of which a root certificate has
    (signerd's own verifier and Notary refuse a CA:TRUE root certificate); and it signs a
    BER (indefinite-length) TBSCertificate, which is no certificate's DER."""
    gun = unique_gun()
    with daemon.client("admin") as c:
        root = c.create_key(gun, "root", "ecdsa-p256")
    spki = root.public_key_der
    assert _sign(daemon, "admin", root.key_id, _tbs(spki, gun))[0] == grpc.StatusCode.OK
    hostile = _tbs(spki, gun, [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": {"ca": True}},
        {"extn_id": "key_usage", "critical": True,
         "extn_value": {"key_cert_sign", "crl_sign", "digital_signature"}},
        {"extn_id": "subject_alt_name", "critical": False, "extn_value": [
            asn1x509.GeneralName({"uniform_resource_identifier": "spiffe://test/admin"}),
            asn1x509.GeneralName({"dns_name": "signerd.example"})]},
        {"extn_id": "extended_key_usage", "critical": False,
         "extn_value": ["server_auth", "client_auth"]},
    ])
    inner = asn1x509.TbsCertificate.load(_tbs(spki, gun)).contents
    ber = b"\x30\x80" + inner + b"\x00\x00"
    signed = [what for what, payload in (("CA/SAN/EKU", hostile), ("BER", ber))
              if _sign(daemon, "admin", root.key_id, payload)[0] == grpc.StatusCode.OK]
    assert not signed, f"root metadata key {root.key_id} signed TBSCertificates: {signed}"
