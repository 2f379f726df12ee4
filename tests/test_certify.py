"""X.509 certificates for token keys: CertifyKey, GetCertificateChain and
``signerctl keys certify`` / ``keys export --certificate``, against a real
daemon (in process, real mTLS, real SoftHSM).

Chains are checked with ``cryptography``'s verifier (PolicyBuilder) and
against the Notary Project's "Certificate Requirements"
(notaryproject/specifications specs/signature-specification.md), and the
certificate objects are read back with OpenSC's ``pkcs11-tool`` in another
process: the standard PKCS#11 place other clients look."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)

from signerd import certs
from signerd.v1 import signer_pb2 as pb
from tests.adapter_helpers import write_client_toml
from tests.conftest import ADMIN_POLICY, HSM, RUNNER, Daemon, rpc_error, unique_gun

SUBJECT = "CN=acme signer,O=Acme,ST=WA,C=US"


# -- checks shared with tests/test_notation_plugin.py -------------------------


def _leaf_key_usage(policy: Any, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    # signature-specification.md, Leaf Certificates: digitalSignature, and none
    # of keyEncipherment, dataEncipherment, keyAgreement, keyCertSign, cRLSign.
    assert ku is not None and ku.digital_signature
    assert not (ku.key_encipherment or ku.data_encipherment or ku.key_agreement
                or ku.key_cert_sign or ku.crl_sign)


def _leaf_eku(policy: Any, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    assert eku is None or list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]


def _leaf_basic_constraints(policy: Any, cert: x509.Certificate,
                            bc: x509.BasicConstraints | None) -> None:
    assert bc is None or not bc.ca


def verify_notary_chain(ders: Sequence[bytes], at: dt.datetime | None = None) -> None:
    """Validate a chain (DER, leaf first) as a Notary Project code-signing
    chain: cryptography's path validation to the chain's own root, with the
    leaf rules as an extension policy, then each extension rule by hand."""
    chain = [x509.load_der_x509_certificate(d) for d in ders]
    leaf_policy = (
        ExtensionPolicy.permit_all()
        .require_present(x509.KeyUsage, Criticality.CRITICAL, _leaf_key_usage)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _leaf_eku)
        .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _leaf_basic_constraints)
    )
    verifier = (
        PolicyBuilder().store(Store([chain[-1]])).time(at or dt.datetime.now(dt.UTC))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
        .build_client_verifier()
    )
    verified = verifier.verify(chain[0], chain[1:-1])
    assert [c.fingerprint(hashes.SHA256()) for c in verified.chain] == [
        c.fingerprint(hashes.SHA256()) for c in chain]
    # The same requirements, spelled out.
    leaf = chain[0]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CODE_SIGNING]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for ca in chain[1:]:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
        assert bc.critical and bc.value.ca and ku.critical and ku.value.key_cert_sign
    for cert in chain:  # "MUST NOT use SHA1WithRSA and ECDSAWithSHA1 signatures"
        assert cert.signature_hash_algorithm is None or \
            cert.signature_hash_algorithm.name != "sha1"
    assert not certs.code_signing_problems(leaf)


def make_chain(c: Any, leaf_algorithm: str = "ecdsa-p256", root_algorithm: str = "ecdsa-p256",
               subject: str = SUBJECT) -> tuple[Any, Any, list[bytes]]:
    """A root key on the root token certified by itself, and a leaf key on
    the online token certified by it: (root key, leaf key, leaf's chain)."""
    root = c.create_key(unique_gun(), "root", root_algorithm, purpose="raw")
    leaf = c.create_key(unique_gun(), "targets", leaf_algorithm, purpose="raw")
    c.certify_key(root.key_id, "CN=acme root,O=Acme,C=US")
    chain = c.certify_key(leaf.key_id, subject, root.key_id)
    return root, leaf, chain


def token_certificates(hsm: HSM, label: str) -> list[tuple[bytes, str, bytes]]:
    """(CKA_ID, CKA_LABEL, DER) of every X.509 certificate object on a SoftHSM
    token, as OpenSC's pkcs11-tool reads them from another process (public
    objects: no login)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(hsm.conf)}
    base = ["pkcs11-tool", "--module", hsm.module, "--token-label", label]
    listing = subprocess.run([*base, "--list-objects", "--type", "cert"], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    found = []
    for block in listing.split("Certificate Object")[1:]:
        fields = dict(line.strip().split(":", 1) for line in block.splitlines()
                      if ":" in line and not line.startswith("Certificate"))
        object_id = bytes.fromhex(fields["ID"].strip())
        der = subprocess.run(
            [*base, "--read-object", "--type", "cert", "--id", object_id.hex()], env=env,
            capture_output=True, timeout=60, check=True).stdout
        found.append((object_id, fields["label"].strip(), der))
    return found


# -- the RPCs ---------------------------------------------------------------------


@pytest.mark.parametrize(("root_algorithm", "leaf_algorithm"), [
    ("ecdsa-p256", "ecdsa-p256"),
    ("ecdsa-p384", "ecdsa-p384"),
    ("rsa-2048", "ecdsa-p256"),
    ("ecdsa-p256", "rsa-3072"),
    ("rsa-3072", "rsa-2048"),
])
def test_root_and_leaf_make_a_notary_code_signing_chain(
    daemon: Daemon, root_algorithm: str, leaf_algorithm: str
) -> None:
    with daemon.client() as c:
        root, leaf, chain = make_chain(c, leaf_algorithm, root_algorithm)
        assert c.certificate_chain(leaf.key_id) == chain
        assert c.certificate_chain(root.key_id) == chain[1:]
    assert len(chain) == 2
    verify_notary_chain(chain)
    leaf_cert, root_cert = (x509.load_der_x509_certificate(d) for d in chain)
    assert leaf_cert.subject.rfc4514_string() == SUBJECT
    assert leaf_cert.issuer == root_cert.subject == root_cert.issuer
    assert certs.spki_of(leaf_cert) == leaf.public_key_der
    assert certs.spki_of(root_cert) == root.public_key_der
    expected_hash = {"ecdsa-p384": "sha384"}.get(root_algorithm, "sha256")
    assert leaf_cert.signature_hash_algorithm is not None
    assert leaf_cert.signature_hash_algorithm.name == expected_hash
    # Validity: 365 days for a leaf, 3650 for a CA, from 5 minutes ago.
    assert leaf_cert.not_valid_after_utc - leaf_cert.not_valid_before_utc == dt.timedelta(365)
    assert root_cert.not_valid_after_utc - root_cert.not_valid_before_utc == dt.timedelta(3650)
    assert 0 < leaf_cert.serial_number < 2**159


def test_intermediate_ca_and_a_chain_of_three(daemon: Daemon) -> None:
    with daemon.client() as c:
        root, mid, _ = make_chain(c)  # "mid" first gets a leaf certificate...
        as_ca = c.certify_key(mid.key_id, "CN=acme intermediate,O=Acme,C=US", root.key_id,
                              profile="ca")  # ...then is re-certified as a CA
        leaf = c.create_key(unique_gun(), "targets/releases", "ecdsa-p384", purpose="raw")
        chain = c.certify_key(leaf.key_id, SUBJECT, mid.key_id, days=30)
    assert len(as_ca) == 2 and len(chain) == 3 and chain[1:] == as_ca
    verify_notary_chain(chain)
    leaf_cert = x509.load_der_x509_certificate(chain[0])
    assert leaf_cert.not_valid_after_utc - leaf_cert.not_valid_before_utc == dt.timedelta(30)


def test_self_signed_code_signing_certificate_is_a_chain_of_one(daemon: Daemon) -> None:
    # signature-specification.md, "Other requirements" 1: a chain of only a
    # root must meet the leaf requirements.
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", "ecdsa-p256", purpose="raw")
        chain = c.certify_key(key.key_id, SUBJECT, profile="code-signing")
    (cert,) = (x509.load_der_x509_certificate(d) for d in chain)
    assert certs.self_signed(cert) and not certs.code_signing_problems(cert)


def test_certificate_objects_on_the_token(daemon: Daemon, hsm: HSM) -> None:
    """What another PKCS#11 client sees: one CKO_CERTIFICATE per key, with the
    key pair's CKA_ID and a label of at most 40 bytes; certifying again
    replaces it, and deleting the key deletes it."""
    with daemon.client() as c:
        root, leaf, chain = make_chain(c)
        objects = {der: (object_id, label) for object_id, label, der in
                   token_certificates(hsm, "test-online")}
        assert chain[0] in objects
        object_id, label = objects[chain[0]]
        assert label == f"signerd-cert:{leaf.key_id[:27]}" and len(label.encode()) <= 40
        # CKA_ID is the key pair's (what pkcs11-tool lists for the key)
        keys = subprocess.run(
            ["pkcs11-tool", "--module", hsm.module, "--token-label", "test-online",
             "--list-objects", "--type", "pubkey"],
            env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf)}, capture_output=True, text=True,
            timeout=60, check=True).stdout
        assert f"ID:         {object_id.hex()}" in keys
        assert chain[1] in {der for _, _, der in token_certificates(hsm, "test-root")}

        again = c.certify_key(leaf.key_id, "CN=renewed,O=Acme,ST=WA,C=US", root.key_id)
        mine = [der for oid, _, der in token_certificates(hsm, "test-online") if oid == object_id]
        assert mine == [again[0]] and again[0] != chain[0]
        assert c.certificate_chain(leaf.key_id) == again

        c.delete_key(leaf.key_id)
        assert object_id not in {oid for oid, _, _ in token_certificates(hsm, "test-online")}


def test_certifying_is_audited_as_the_issuer_signing_the_tbs(daemon: Daemon) -> None:
    with daemon.client() as c:
        root, leaf, chain = make_chain(c)
    tbs = x509.load_der_x509_certificate(chain[0]).tbs_certificate_bytes
    lines = [json.loads(line) for line in
             (daemon.workdir / "audit.log").read_text().splitlines() if line.strip()]
    signs = [entry for entry in lines if entry.get("key_id") == f"{root.key_id},{leaf.key_id}"]
    assert len(signs) == 1
    assert signs[0]["operation"] == "sign" and signs[0]["status"] == "OK"
    assert signs[0]["payload_sha256"] == hashlib.sha256(tbs).hexdigest()
    assert signs[0]["role"] == "root"  # the issuer key's


def test_chain_errors_name_what_is_missing(daemon: Daemon) -> None:
    with daemon.client() as c:
        bare = c.create_key(unique_gun(), "targets", purpose="raw")
        for call in (lambda: c.certificate_chain("ab" * 32),
                     lambda: c.certify_key("ab" * 32, SUBJECT),
                     lambda: c.certify_key(bare.key_id, SUBJECT, "cd" * 32)):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND and "no key with ID" in err.details()

        err = rpc_error(lambda: c.certificate_chain(bare.key_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"key {bare.key_id} has no certificate" in err.details()
        assert f"signerctl keys certify {bare.key_id}" in err.details()

        issuer = c.create_key(unique_gun(), "root", purpose="raw")
        err = rpc_error(lambda: c.certify_key(bare.key_id, SUBJECT, issuer.key_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"key {issuer.key_id} has no certificate" in err.details()

        root, leaf, _ = make_chain(c)
        err = rpc_error(lambda: c.certify_key(bare.key_id, SUBJECT, leaf.key_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not a CA" in err.details()

        # The root gets a new subject: the leaf's certificate no longer chains.
        c.certify_key(root.key_id, "CN=another root,O=Acme,C=US")
        err = rpc_error(lambda: c.certificate_chain(leaf.key_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"certify key {leaf.key_id} again" in err.details()

        # The root is gone: the leaf's issuer is not on any token.
        c.delete_key(root.key_id)
        err = rpc_error(lambda: c.certificate_chain(leaf.key_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is not a key on signerd's tokens" in err.details()


@pytest.mark.parametrize(("subject", "days", "profile", "message"), [
    ("", 0, 0, "subject is required"),
    ("CN", 0, 0, "invalid subject 'CN'"),
    ("C=USA", 0, 0, "invalid subject 'C=USA'"),
    (SUBJECT, -1, 0, "validity must be between 1 and 36500 days, got -1"),
    (SUBJECT, 36501, 0, "validity must be between 1 and 36500 days"),
    (SUBJECT, 0, 7, "unknown profile 7"),
])
def test_malformed_certify_requests_are_invalid_argument(
    daemon: Daemon, subject: str, days: int, profile: int, message: str
) -> None:
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        err = rpc_error(lambda: c.stub.CertifyKey(pb.CertifyKeyRequest(
            key_id=key.key_id, subject=subject, validity_days=days, profile=profile)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_certify_needs_sign_on_the_issuer_and_create_on_the_subject(daemon_factory: Any) -> None:
    ci, other = "docker.io/ci/app", "docker.io/other/app"
    policy = ADMIN_POLICY + f"""
[[rule]]
name = "runner-ci"
identities = ["{RUNNER}"]
operations = ["create", "read", "sign"]
guns = ["{ci}"]

[[rule]]
name = "runner-other-sign-only"
identities = ["{RUNNER}"]
operations = ["read", "sign"]
guns = ["{other}"]
"""
    d = daemon_factory(policy=policy)
    with d.client() as admin, d.client("runner") as runner:
        root = admin.create_key(unique_gun(), "root", purpose="raw")
        admin.certify_key(root.key_id, "CN=root,O=Acme,C=US")
        ca = admin.create_key(ci, "targets", purpose="raw")
        admin.certify_key(ca.key_id, "CN=ci ca,O=Acme,C=US", root.key_id, profile="ca")
        mine = runner.create_key(ci, "targets/releases", purpose="raw")
        theirs = admin.create_key(other, "targets/releases", purpose="raw")

        # sign on the root key: not granted, nor read: as if it did not exist
        err = rpc_error(lambda: runner.certify_key(mine.key_id, SUBJECT, root.key_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"no key with ID {root.key_id}"
        # create on the subject: not granted (read and sign are)
        err = rpc_error(lambda: runner.certify_key(theirs.key_id, SUBJECT, ca.key_id))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"may not certify targets/releases keys of {other}" in err.details()
        assert "no rule grants create" in err.details()

        chain = runner.certify_key(mine.key_id, SUBJECT, ca.key_id)
        assert runner.certificate_chain(mine.key_id) == chain
        verify_notary_chain(chain)
        # read on the key is enough for its chain; none on a key of another GUN
        err = rpc_error(lambda: runner.certificate_chain(root.key_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    denied = [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()
              if '"deny"' in line]
    assert {e["key_id"] for e in denied} >= {theirs.key_id, f"{root.key_id},{mine.key_id}"}


# -- signerctl ------------------------------------------------------------------------


def signerctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signerd.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_signerctl_keys_certify_and_export_certificate(daemon: Daemon, tmp_path: Path) -> None:
    config = write_client_toml(daemon.client_config(), tmp_path / "client.toml")
    with daemon.client() as c:
        root = c.create_key(unique_gun(), "root", "ecdsa-p384", purpose="raw")
        leaf = c.create_key(unique_gun(), "targets", "rsa-2048", purpose="raw")

    out = signerctl(config, "keys", "certify", root.key_id, "--subject", "CN=ci root,O=Acme,C=US")
    assert out.returncode == 0, out.stderr
    assert f"certified key {root.key_id}: CA certificate" in out.stdout
    assert "subject CN=ci root,O=Acme,C=US" in out.stdout

    out = signerctl(config, "keys", "certify", leaf.key_id, "--subject", SUBJECT,
                    "--issuer-key", root.key_id, "--days", "90", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["key_id"] == leaf.key_id and data["subject"] == SUBJECT
    assert data["issuer"] == "CN=ci root,O=Acme,C=US" and data["ca"] is False
    assert [c["ca"] for c in data["chain"]] == [False, True]

    out = signerctl(config, "keys", "export", leaf.key_id, "--certificate")
    assert out.returncode == 0, out.stderr
    assert out.stdout == data["chain_pem"]
    pems = x509.load_pem_x509_certificates(out.stdout.encode())
    chain = [c.public_bytes(serialization.Encoding.DER) for c in pems]
    verify_notary_chain(chain)
    leaf_cert = pems[0]
    assert leaf_cert.not_valid_after_utc - leaf_cert.not_valid_before_utc == dt.timedelta(90)

    # The public key export is unchanged.
    out = signerctl(config, "keys", "export", leaf.key_id)
    assert out.returncode == 0 and out.stdout == leaf.public_key_pem

    for args, message in [
        (("keys", "export", leaf.key_id, "--certificate", "--format", "der"),
         "--certificate writes the chain as PEM"),
        (("keys", "certify", leaf.key_id, "--subject", "nonsense"), "INVALID_ARGUMENT"),
        (("keys", "export", "ab" * 32, "--certificate"), "NOT_FOUND: no key with ID"),
    ]:
        out = signerctl(config, *args)
        assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
        assert out.stderr.count("\n") == 1


def test_a_restarted_daemon_reads_the_chain_from_the_tokens(daemon_factory: Any) -> None:
    first = daemon_factory("first")
    with first.client() as c:
        _, leaf, chain = make_chain(c)
    first.stop()
    second = daemon_factory("second")
    with second.client() as c:
        assert c.certificate_chain(leaf.key_id) == chain


def test_ed25519_keys_certify_too(daemon: Daemon) -> None:
    # X.509 with Ed25519 (RFC 8410); Notation has no Ed25519, the chain is for others.
    with daemon.client() as c:
        root = c.create_key(unique_gun(), "root", "ed25519", purpose="raw")
        leaf = c.create_key(unique_gun(), "targets", "ed25519", purpose="raw")
        c.certify_key(root.key_id, "CN=ed root,O=Acme,C=US")
        chain = c.certify_key(leaf.key_id, SUBJECT, root.key_id)
    leaf_cert, root_cert = (x509.load_der_x509_certificate(d) for d in chain)
    assert leaf_cert.signature_algorithm_oid.dotted_string == "1.3.101.112"
    assert certs.issued_by(leaf_cert, root_cert) and certs.self_signed(root_cert)
