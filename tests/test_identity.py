"""Typed identities (issue "Hardening round 3" §2): every name source against
every rule kind, over real mTLS with real certificates, the Unix socket and
the plaintext development listener; impostor certificates refused on every
signing path; policy patterns that could only mislead refused at load."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from signerd import pki
from signerd.client import Client, ClientConfig
from signerd.errors import ConfigError
from signerd.notary import signer_pb2 as notary_pb
from signerd.notary import signer_pb2_grpc as notary_grpc
from signerd.policy import Identity, Policy, Request
from signerd.v1 import signer_pb2 as pb
from tests.conftest import HSM, PKI, Daemon, daemon_config, rpc_error, start_daemon

URI = "spiffe://ci/runner-a"
DNS = "runner-a.ci.example"
CN = "runner-a"
UID = os.getuid()

# One rule per way of naming runner-a, each granting "create" on a GUN of
# its own: which GUNs a caller may create keys in says which rules match it.
RULES = {
    "uri": f"uri:{URI}",
    "uri-unkinded": URI,  # an older file's URI: URI SANs only
    "dns": f"dns:{DNS}",
    "name-unkinded-dns": DNS,  # an older file's bare name: a DNS SAN or a CN
    "cn": f"cn:{CN}",
    "name-unkinded-cn": CN,
    "uid": f"uid:{UID}",
    "dev": "dev:loopback",
    "any": "*",
}
POLICY = "".join(f"""
[[rule]]
name = "{name}"
identities = ["{pattern}"]
operations = ["create"]
guns = ["docker.io/kinds/{name}"]
roles = ["targets"]
""" for name, pattern in RULES.items()) + f"""
[[rule]]
name = "runner-a"
identities = ["{URI}"]
operations = ["*"]
guns = ["docker.io/runner-a/*"]
"""

# Name source -> (the identity it gives, the rules that grant it).
SOURCES: dict[str, tuple[str, set[str]]] = {
    "uri-san": (f"uri:{URI}", {"uri", "uri-unkinded", "any"}),
    "dns-san": (f"dns:{DNS}", {"dns", "name-unkinded-dns", "any"}),
    "cn": (f"cn:{CN}", {"cn", "name-unkinded-cn", "any"}),
    "unix-uid": (f"uid:{UID}", {"uid", "any"}),
    "dev-plaintext": ("dev:loopback", {"dev", "any"}),
}

# Certificates that pose as another kind of identity: refused, whatever the policy.
IMPOSTORS: dict[str, dict[str, Any]] = {
    "cn-is-a-uri": {"cn": URI},  # the issue's case: runner-a's rights from a CN
    "cn-is-dev-loopback": {"cn": "dev:loopback"},
    "cn-is-a-uid": {"cn": "uid:0"},
    "cn-with-upper-case-kind": {"cn": f"URI:{URI}"},
    "dns-san-is-a-uri": {"cn": CN, "dns": (URI,)},
    "uri-san-without-scheme": {"cn": CN, "uris": ("runner-a",)},
}


@dataclass
class Listeners:
    tls: Daemon
    dev: Daemon
    certs: PKI
    dir: Path

    def client(self, source: str) -> Client:
        if source == "unix-uid":
            return self.tls.unix_client()
        if source == "dev-plaintext":
            return Client(ClientConfig(f"127.0.0.1:{self.dev.port}", plaintext=True, timeout=20))
        cert, key = self.certs.files[f"id-{source}"]
        return Client(ClientConfig(f"127.0.0.1:{self.tls.port}", self.certs.ca_file, cert, key,
                                   "localhost", 20))


@pytest.fixture(scope="module")
def listeners(hsm: HSM, certs: PKI, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Listeners]:
    """One daemon serving mTLS and the Unix socket, one the plaintext dev
    listener, both with POLICY; the certificates of every name source and
    of every impostor, issued by the test CA."""
    base = tmp_path_factory.mktemp("identity")
    certs.add("id-uri-san", pki.issue(certs.ca, CN, server=False, dns=(DNS,), uris=(URI,)))
    certs.add("id-dns-san", pki.issue(certs.ca, CN, server=False, dns=(DNS,)))
    certs.add("id-cn", pki.issue(certs.ca, CN, server=False))
    for name, fields in IMPOSTORS.items():
        certs.add(f"id-{name}", pki.issue(certs.ca, fields["cn"], server=False,
                                          dns=fields.get("dns", ()),
                                          uris=fields.get("uris", ())))
    tls = start_daemon(daemon_config(hsm, certs, base / "tls", POLICY, server={
        "unix_socket": str(base / "s.sock")}), certs, base / "tls")
    dev = start_daemon(daemon_config(hsm, certs, base / "dev", POLICY, server={
        "dev_plaintext": True}), certs, base / "dev")
    yield Listeners(tls, dev, certs, base)
    tls.stop()
    dev.stop()


def last_audit_line(d: Daemon) -> dict[str, Any]:
    line: dict[str, Any] = json.loads((d.workdir / "audit.log").read_text().splitlines()[-1])
    return line


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("source", list(SOURCES))
def test_a_name_matches_rules_of_its_own_kind_only(listeners: Listeners, source: str,
                                                   rule: str) -> None:
    identity, granted = SOURCES[source]
    daemon = listeners.dev if source == "dev-plaintext" else listeners.tls
    with listeners.client(source) as c:
        if rule in granted:
            assert c.create_key(f"docker.io/kinds/{rule}", "targets", purpose="raw").key_id
        else:
            err = rpc_error(lambda: c.create_key(f"docker.io/kinds/{rule}", "targets",
                                                 purpose="raw"))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert err.details().startswith(f"identity {identity!r} may not create ")
    line = last_audit_line(daemon)
    assert (line["identity"], line["gun"]) == (identity, f"docker.io/kinds/{rule}")
    assert line["decision"] == ("allow" if rule in granted else "deny")


def _every_signing_path(c: Client, key: pb.Key) -> list[tuple[str, Any]]:
    notary = notary_grpc.SignerStub(c.channel)
    return [
        ("Sign", lambda: c.sign(key.key_id, message=b"m")),
        ("SignBatch", lambda: c.stub.SignBatch(pb.SignBatchRequest(
            requests=[pb.SignRequest(key_id=key.key_id, message=b"m")]), timeout=20)),
        ("SignStream", lambda: list(c.sign_stream(
            [pb.SignRequest(key_id=key.key_id, message=b"m")], timeout=20))),
        ("Notary Sign", lambda: notary.Sign(notary_pb.SignatureRequest(
            keyID=notary_pb.KeyID(ID=key.key_id), content=b"{}"), timeout=20)),
        ("CertifyKey", lambda: c.certify_key(key.key_id, "CN=runner-a")),
        ("GetKey", lambda: c.get_key(key.key_id)),
    ]


@pytest.mark.parametrize("impostor", list(IMPOSTORS))
def test_a_certificate_posing_as_another_kind_is_refused(listeners: Listeners,
                                                         impostor: str) -> None:
    """Regression: a certificate with CN spiffe://ci/runner-a and no SAN got
    runner-a's rights (Sign, SignBatch, SignStream, Notary Sign, CertifyKey
    on its key). Now every call of such a certificate is UNAUTHENTICATED,
    and audited with no identity."""
    with listeners.client("uri-san") as owner:
        key = owner.create_key("docker.io/runner-a/app", "targets", purpose="raw")
        assert owner.sign(key.key_id, message=b"m").signature  # the real runner-a may
    cert, private = listeners.certs.files[f"id-{impostor}"]
    with Client(ClientConfig(f"127.0.0.1:{listeners.tls.port}", listeners.certs.ca_file, cert,
                             private, "localhost", 20)) as c:
        for what, call in _every_signing_path(c, key):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (what, err.details())
            assert "client certificate" in err.details(), (what, err.details())
            line = last_audit_line(listeners.tls)
            assert (line["identity"], line["status"]) == ("", "UNAUTHENTICATED"), what


@pytest.mark.parametrize(("pattern", "message"), [
    pytest.param("URI:spiffe://ci/x", "write the kind 'uri' in lower case", id="upper-kind"),
    pytest.param("Uid:0", "write the kind 'uid' in lower case", id="upper-uid"),
    pytest.param("cn:spiffe://ci/x", "a CN that starts with a URI scheme is refused",
                 id="cn-that-is-a-uri"),
    pytest.param("cn:dev:loopback", "a CN that starts with a URI scheme is refused",
                 id="cn-that-is-a-kind"),
    pytest.param("dns:ci/x", "a DNS SAN holds a host name", id="dns-not-a-host"),
    pytest.param("uid:root", "a uid is a decimal number", id="uid-not-a-number"),
    pytest.param("uri:", "uri: needs a name after it", id="kind-without-name"),
    pytest.param("*:8080", "is ambiguous; write the kind before it", id="ambiguous-colon"),
])
def test_an_identity_pattern_that_could_only_mislead_is_refused(pattern: str,
                                                                message: str) -> None:
    with pytest.raises(ConfigError, match="field 'identities'") as info:
        Policy.parse({"rule": [{"identities": [pattern], "operations": ["read"]}]}, "<t>")
    assert message in str(info.value)


@pytest.mark.parametrize(("pattern", "identity", "matches"), [
    ("spiffe://ci/*", "uri:spiffe://ci/a", True),
    ("spiffe://ci/*", "cn:spiffe://ci/a", False),  # never given, and never matched
    ("spiffe://ci/*", "dns:spiffe", False),
    ("ci-*", "cn:ci-1", True),
    ("ci-*", "dns:ci-1.example", True),
    ("ci-*", "uri:ci-1:x", False),
    ("uid:0", "uid:0", True),
    ("uid:0", "cn:uid:0", False),
    ("dev:loopback", "dev:loopback", True),
    ("dev:loopback", "uri:dev:loopback", False),  # a URI SAN whose scheme is "dev"
    ("uri:dev:loopback", "uri:dev:loopback", True),
    ("*", "uri:spiffe://x", True),
    ("*", "uid:1000", True),
    ("cn:*", "dns:a.example", False),
])
def test_how_a_pattern_reads_its_kind(pattern: str, identity: str, matches: bool) -> None:
    policy = Policy.parse({"rule": [{"identities": [pattern], "operations": ["read"]}]}, "<t>")
    transport = "unix" if identity.startswith("uid:") else "tcp"
    assert policy.allows(Request(Identity.parse(identity), transport, "read")) is matches
