"""notation-signerd run as Notation runs a plugin (notaryproject/specifications
specs/plugin-extensibility.md, contract 1.0): a subprocess given the command
as its only argument, the JSON request on stdin, the JSON response on stdout
with exit 0, or exit 1 and ``{"errorCode","errorMessage"}`` on stderr.
Against a real daemon (in process, real mTLS, real SoftHSM) through a
client.toml in SIGNERCTL_CONFIG.

generate-signature is fed what notation-go feeds it: the JWS signing input
``BASE64URL(protected headers) '.' BASE64URL(payload)``, base64 encoded once
more (signer/plugin.go, pluginPrimitiveSigner.Sign). Its answer is checked as
notation-go checks it before building the envelope: the signature verifies
with the leaf's public key (ECDSA raw r||s, as JWS ES256/ES384 carry it;
RSASSA-PSS with salt = hash length, as go-cose requires and golang-jwt
accepts), and the chain meets the Certificate Requirements
(tests/test_certify.py's verify_notary_chain)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from signerd import signing
from signerd.adapters.notation import SPEC_ALGORITHMS
from signerd.keys import parse_algorithm
from tests.adapter_helpers import closed_port, write_client_toml
from tests.conftest import ADMIN_POLICY, RUNNER, Daemon, rpc_error, unique_gun
from tests.test_certify import SUBJECT, verify_notary_chain

JWS_ALG = {"ECDSA-SHA-256": "ES256", "ECDSA-SHA-384": "ES384", "RSASSA-PSS-SHA-256": "PS256",
           "RSASSA-PSS-SHA-384": "PS384", "RSASSA-PSS-SHA-512": "PS512"}
HASHES = {"SHA-256": hashes.SHA256(), "SHA-384": hashes.SHA384(), "SHA-512": hashes.SHA512()}
SPECS = {"ecdsa-p256": "EC-256", "ecdsa-p384": "EC-384", "rsa-2048": "RSA-2048",
         "rsa-3072": "RSA-3072", "rsa-4096": "RSA-4096"}


def run(command: str, request: dict[str, Any] | bytes, config: Path | None,
        *args: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Run the plugin once as Notation does; return (response, None) on exit
    0 or (None, error) on exit 1, checking that nothing else was written."""
    stdin = request if isinstance(request, bytes) else json.dumps(request).encode()
    env = {**os.environ}
    env.pop("SIGNERCTL_CONFIG", None)
    if config is not None:
        env["SIGNERCTL_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, "-m", "signerd.adapters.notation", command, *args],
                          input=stdin, capture_output=True, timeout=120, env=env)
    if proc.returncode == 0:
        assert proc.stderr == b"", proc.stderr
        response = json.loads(proc.stdout)
        assert isinstance(response, dict)
        return response, None
    assert proc.returncode == 1 and proc.stdout == b"", (proc.returncode, proc.stdout)
    error = json.loads(proc.stderr)  # nothing but the JSON error on stderr
    assert set(error) == {"errorCode", "errorMessage"} and error["errorMessage"], error
    return None, error


def error_of(command: str, request: dict[str, Any] | bytes, config: Path | None,
             *args: str) -> tuple[str, str]:
    response, error = run(command, request, config, *args)
    assert error is not None, response
    return error["errorCode"], error["errorMessage"]


def jws_signing_input(alg: str) -> bytes:
    """What notation-go hands a SIGNATURE_GENERATOR.RAW plugin to sign: the
    JWS signing input of a Notary Project signature (signature-envelope-jws.md)."""
    def b64url(data: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")

    headers = {
        "alg": alg,
        "crit": ["io.cncf.notary.signingScheme"],
        "cty": "application/vnd.cncf.notary.payload.v1+json",
        "io.cncf.notary.signingScheme": "notary.x509",
        "io.cncf.notary.signingTime": "2026-01-02T03:04:05Z",
    }
    payload = {"targetArtifact": {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + hashlib.sha256(b"an image manifest").hexdigest(),
        "size": 1234,
    }}
    return b64url(headers) + b"." + b64url(payload)


def sign_request(key_id: str, key_spec: str, payload: bytes, **extra: Any) -> dict[str, Any]:
    """generate-signature's request as notation-go marshals it ([]byte → base64)."""
    return {"contractVersion": "1.0", "keyId": key_id, "keySpec": key_spec,
            "hashAlgorithm": SPEC_ALGORITHMS.get(key_spec, ("SHA-256", ""))[0],
            "payload": base64.b64encode(payload).decode(), **extra}


def verify_like_notation(leaf: x509.Certificate, signature: bytes, signed: bytes,
                         hash_name: str) -> None:
    """Raises InvalidSignature unless ``signature`` verifies as a JWS/COSE
    verifier checks it with the leaf's key."""
    chosen = HASHES[hash_name]
    public = leaf.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        assert len(signature) == 2 * size  # raw r||s, RFC 7518 §3.4
        der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                         int.from_bytes(signature[size:], "big"))
        public.verify(der, signed, ec.ECDSA(chosen))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert len(signature) == public.key_size // 8
        public.verify(signature, signed, padding.PSS(padding.MGF1(chosen), chosen.digest_size),
                      chosen)


@pytest.fixture
def config(daemon: Daemon, tmp_path: Path) -> Path:
    return write_client_toml(daemon.client_config(), tmp_path / "client.toml")


def certified(daemon: Daemon, algorithm: str, root_algorithm: str = "ecdsa-p256") -> Any:
    """A key of ``algorithm`` with a code-signing certificate from a root key."""
    with daemon.client() as c:
        root = c.create_key(unique_gun(), "root", root_algorithm, purpose="raw")
        key = c.create_key(unique_gun(), "targets", algorithm, purpose="raw")
        c.certify_key(root.key_id, "CN=acme root,O=Acme,C=US")
        c.certify_key(key.key_id, SUBJECT, root.key_id)
    return key


# -- get-plugin-metadata ----------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"{}", b"", b'{"pluginConfig": {"config": "/nowhere"}}',
                                   b'{"somethingNew": 1}'])
def test_get_plugin_metadata(stdin: bytes, tmp_path: Path) -> None:
    # Static: it works with no signerd and no client config at all.
    response, _ = run("get-plugin-metadata", stdin, tmp_path / "missing.toml")
    assert response is not None
    assert response["name"] == "signerd"  # notation-signerd in .../plugins/signerd/
    assert response["supportedContractVersions"] == ["1.0"]
    assert response["capabilities"] == ["SIGNATURE_GENERATOR.RAW"]
    assert all(isinstance(response[k], str) and response[k]
               for k in ("description", "version", "url"))
    # Regression: it named a package-index page under the name signerd, which
    # signerd does not hold (anyone could claim it); now this installation's files.
    assert response["url"].startswith("file:///") and "pypi" not in response["url"]
    assert Path(response["url"].removeprefix("file://")).exists()
    major, minor, patch = response["version"].split("+")[0].split("-")[0].split(".")
    assert major.isdigit() and minor.isdigit() and patch.isdigit()  # SemVer


# -- describe-key -------------------------------------------------------------------


def test_describe_key_for_every_key_spec_softhsm_supports(daemon: Daemon, config: Path) -> None:
    with daemon.client() as c:
        [token] = [t for t in c.list_tokens() if t.name == "online"]
        supported = [a for a in token.algorithms if a in SPECS]
        assert supported == list(SPECS)  # SoftHSM makes every spec signerd has
        made = {a: c.create_key(unique_gun(), "targets", a, purpose="raw") for a in supported}
        ed = c.create_key(unique_gun(), "targets", "ed25519", purpose="raw")
    for algorithm, key in made.items():
        request = {"contractVersion": "1.0", "keyId": key.key_id, "pluginConfig": {},
                   "unknownField": {"added": "in 1.1"}}
        response, _ = run("describe-key", request, config)
        assert response == {"keyId": key.key_id, "keySpec": SPECS[algorithm]}
    code, message = error_of("describe-key", {"contractVersion": "1.0", "keyId": ed.key_id},
                             config)
    assert code == "VALIDATION_ERROR" and "is ed25519, which Notation cannot use" in message


# -- generate-signature ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(SPECS))
def test_generate_signature_as_notation_signs_and_verifies(
    daemon: Daemon, config: Path, algorithm: str
) -> None:
    key = certified(daemon, algorithm, "rsa-2048" if algorithm == "ecdsa-p384" else "ecdsa-p256")
    described, _ = run("describe-key", {"contractVersion": "1.0", "keyId": key.key_id}, config)
    assert described is not None
    key_spec = described["keySpec"]
    hash_name, signing_algorithm = SPEC_ALGORITHMS[key_spec]
    signed = jws_signing_input(JWS_ALG[signing_algorithm])
    request = sign_request(key.key_id, key_spec, signed, pluginConfig={"timeout": "30"},
                           futureAttribute=[1, 2])
    response, _ = run("generate-signature", request, config)
    assert response is not None
    assert set(response) == {"keyId", "signature", "signingAlgorithm", "certificateChain"}
    assert response["keyId"] == key.key_id  # notation-go refuses another
    assert response["signingAlgorithm"] == signing_algorithm
    chain = [base64.b64decode(c, validate=True) for c in response["certificateChain"]]
    leaf = x509.load_der_x509_certificate(chain[0])
    verify_like_notation(leaf, base64.b64decode(response["signature"], validate=True), signed,
                         hash_name)
    verify_notary_chain(chain)
    with daemon.client() as c:
        assert c.certificate_chain(key.key_id) == chain


def test_spec_hash_and_algorithm_table() -> None:
    # signature-specification.md "Algorithm Selection" and plugin-extensibility.md
    # generate-signature: signingAlgorithm values and the hash of each key spec.
    assert SPEC_ALGORITHMS == {
        "EC-256": ("SHA-256", "ECDSA-SHA-256"),
        "EC-384": ("SHA-384", "ECDSA-SHA-384"),
        "RSA-2048": ("SHA-256", "RSASSA-PSS-SHA-256"),
        "RSA-3072": ("SHA-384", "RSASSA-PSS-SHA-384"),
        "RSA-4096": ("SHA-512", "RSASSA-PSS-SHA-512"),
    }


# -- errors --------------------------------------------------------------------------


def test_malformed_requests_are_validation_errors(daemon: Daemon, config: Path) -> None:
    key = certified(daemon, "ecdsa-p256")
    with daemon.client() as c:
        uncertified = c.create_key(unique_gun(), "targets", purpose="raw")
        root = c.create_key(unique_gun(), "root", purpose="raw")
        c.certify_key(root.key_id, "CN=acme root,O=Acme,C=US")
    payload = jws_signing_input("ES256")
    good = sign_request(key.key_id, "EC-256", payload)
    cases: list[tuple[str, dict[str, Any] | bytes, str, str]] = [
        ("describe-key", b"{not json", "VALIDATION_ERROR", "not valid JSON"),
        ("generate-signature", b"[1, 2]", "VALIDATION_ERROR", "must be a JSON object"),
        ("describe-key", {"keyId": key.key_id}, "VALIDATION_ERROR", "contractVersion is required"),
        ("describe-key", {"contractVersion": "1.0"}, "VALIDATION_ERROR", "keyId is required"),
        ("describe-key", {"contractVersion": "1.0", "keyId": "my-key"}, "VALIDATION_ERROR",
         "is not a signerd key ID"),
        ("describe-key", {"contractVersion": "1.0", "keyId": "ab" * 32}, "VALIDATION_ERROR",
         "NOT_FOUND: no key with ID"),
        ("generate-signature", {**good, "keyId": "ab" * 32}, "VALIDATION_ERROR",
         "NOT_FOUND: no key with ID"),
        ("generate-signature", {**good, "keySpec": "EC-384", "hashAlgorithm": "SHA-384"},
         "VALIDATION_ERROR", "is EC-256, but the request says keySpec EC-384"),
        ("generate-signature", {**good, "hashAlgorithm": "SHA-512"}, "VALIDATION_ERROR",
         "hashAlgorithm 'SHA-512' does not go with keySpec EC-256, which signs with SHA-256"),
        ("generate-signature", {**good, "keySpec": "EC-521", "hashAlgorithm": "SHA-512"},
         "VALIDATION_ERROR", "keySpec 'EC-521' is not supported"),
        ("generate-signature", {**good, "keySpec": "DSA"}, "VALIDATION_ERROR",
         "keySpec 'DSA' is not a key spec"),
        ("generate-signature", {**good, "payload": "%%%"}, "VALIDATION_ERROR",
         "payload is not base64"),
        ("generate-signature", {**good, "payload": ""}, "VALIDATION_ERROR",
         "payload is required"),
        ("generate-signature", {**good, "pluginConfig": {"server": "x"}}, "VALIDATION_ERROR",
         "unknown pluginConfig key(s) server"),
        ("generate-signature", {**good, "pluginConfig": {"timeout": "soon"}}, "VALIDATION_ERROR",
         "pluginConfig timeout 'soon' must be seconds"),
        ("generate-signature", {**good, "pluginConfig": ["config"]}, "VALIDATION_ERROR",
         "pluginConfig must be a map of strings"),
        ("describe-key", {"contractVersion": "2.0", "keyId": key.key_id},
         "UNSUPPORTED_CONTRACT_VERSION", "'2.0' is not a supported Notation plugin contract"),
        ("generate-signature", {**good, "contractVersion": "2.0"},
         "UNSUPPORTED_CONTRACT_VERSION", "notation-signerd supports 1.0"),
        ("describe-key", {"contractVersion": "one", "keyId": key.key_id},
         "UNSUPPORTED_CONTRACT_VERSION", "'one' is not a supported"),
        # No certificate, or one that cannot sign code: signerd cannot help (ERROR).
        ("generate-signature", sign_request(uncertified.key_id, "EC-256", payload), "ERROR",
         f"signerctl keys certify {uncertified.key_id}"),
        ("generate-signature", sign_request(root.key_id, "EC-256", payload), "ERROR",
         "is not a code-signing certificate"),
    ]
    for command, request, code, message in cases:
        got_code, got_message = error_of(command, request, config)
        assert (got_code, message in got_message) == (code, True), (request, got_message)
    assert error_of("sign", b"{}", config)[0] == "VALIDATION_ERROR"  # not a command
    assert "usage: notation-signerd" in error_of("describe-key", b"{}", config, "extra")[1]
    # A minor version the plugin predates is accepted; its new attributes ignored.
    response, _ = run("generate-signature", {**good, "contractVersion": "1.7", "new": True},
                      config)
    assert response is not None and response["keyId"] == key.key_id


def test_policy_denial_is_access_denied(daemon_factory: Any, tmp_path: Path) -> None:
    ci = "docker.io/ci/app"
    policy = ADMIN_POLICY + f"""
[[rule]]
name = "runner-reads-ci"
identities = ["{RUNNER}"]
operations = ["read"]
guns = ["{ci}"]
"""
    d = daemon_factory(policy=policy)
    with d.client() as c:
        root = c.create_key(unique_gun(), "root", purpose="raw")
        c.certify_key(root.key_id, "CN=acme root,O=Acme,C=US")
        readable = c.create_key(ci, "targets", purpose="raw")
        other = c.create_key(unique_gun(), "targets", purpose="raw")
        for key in (readable, other):
            c.certify_key(key.key_id, SUBJECT, root.key_id)
    runner = write_client_toml(d.client_config("runner"), tmp_path / "runner.toml")
    payload = jws_signing_input("ES256")
    # not readable: as if it did not exist (issue 11 §6)
    code, message = error_of("describe-key", {"contractVersion": "1.0", "keyId": other.key_id},
                             runner)
    assert code == "VALIDATION_ERROR" and f"NOT_FOUND: no key with ID {other.key_id}" in message
    code, message = error_of("generate-signature", sign_request(other.key_id, "EC-256", payload),
                             runner)
    assert code == "VALIDATION_ERROR" and "GetCertificateChain" in message
    # read, but not sign: the chain is given, the signature is not.
    code, message = error_of("generate-signature",
                             sign_request(readable.key_id, "EC-256", payload), runner)
    assert code == "ACCESS_DENIED" and f"Sign {readable.key_id}" in message
    assert "may not sign" in message


def test_daemon_down_is_error(daemon: Daemon, tmp_path: Path) -> None:
    cfg = daemon.client_config()
    down = write_client_toml(
        type(cfg)(f"127.0.0.1:{closed_port()}", cfg.ca, cfg.cert, cfg.key, cfg.server_name, 10),
        tmp_path / "down.toml")
    code, message = error_of("describe-key", {"contractVersion": "1.0", "keyId": "ab" * 32},
                             down)
    assert code == "ERROR" and "UNAVAILABLE" in message and "is signerd running" in message
    code, message = error_of("describe-key", {"contractVersion": "1.0", "keyId": "ab" * 32},
                             tmp_path / "missing.toml")
    assert code == "ERROR" and "no signerd client config at" in message


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung daemon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def test_deadline_is_timeout(daemon: Daemon, tmp_path: Path, silent_listener: int) -> None:
    cfg = daemon.client_config()
    hung = write_client_toml(
        type(cfg)(f"127.0.0.1:{silent_listener}", cfg.ca, cfg.cert, cfg.key, cfg.server_name),
        tmp_path / "hung.toml")
    request = {"contractVersion": "1.0", "keyId": "ab" * 32, "pluginConfig": {"timeout": "1"}}
    code, message = error_of("describe-key", request, hung)
    assert code == "TIMEOUT" and "DEADLINE_EXCEEDED" in message


def test_plugin_config_names_the_client_config(daemon: Daemon, tmp_path: Path) -> None:
    """pluginConfig "config" (from notation key add --plugin-config) beats
    SIGNERCTL_CONFIG."""
    key = certified(daemon, "ecdsa-p384")
    good = write_client_toml(daemon.client_config(), tmp_path / "elsewhere" / "client.toml")
    request = {"contractVersion": "1.0", "keyId": key.key_id,
               "pluginConfig": {"config": str(good)}}
    response, _ = run("describe-key", request, tmp_path / "missing.toml")
    assert response == {"keyId": key.key_id, "keySpec": "EC-384"}
    signed = jws_signing_input("ES384")
    request = sign_request(key.key_id, "EC-384", signed, pluginConfig={"config": str(good)})
    response, _ = run("generate-signature", request, None)
    assert response is not None and response["signingAlgorithm"] == "ECDSA-SHA-384"



def test_rsa_signs_sha256_sha384_and_sha512_digests(daemon: Daemon) -> None:
    """What RSA-3072 and RSA-4096 need for Notation (PS384, PS512): a digest's
    length names its hash, for PSS (MGF1 of that hash, salt = its length) and
    PKCS#1 v1.5 (its DigestInfo) alike."""
    message = b"a JWS signing input"
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", "rsa-2048", purpose="raw")
        public = load_der_public_key(key.public_key_der)
        assert isinstance(public, rsa.RSAPublicKey)
        for chosen in HASHES.values():
            digest = hashlib.new(chosen.name, message).digest()
            pss = c.sign(key.key_id, digest=digest).signature
            public.verify(pss, message, padding.PSS(padding.MGF1(chosen), chosen.digest_size),
                          chosen)
            pkcs1 = c.sign(key.key_id, digest=digest, rsa_padding="pkcs1v15").signature
            public.verify(pkcs1, message, padding.PKCS1v15(), chosen)
            signing.verify(key.public_key_der, parse_algorithm("rsa-2048"), pss, digest,
                           signing.SignOptions(prehashed=True))
        err = rpc_error(lambda: c.sign(key.key_id, digest=b"\x01" * 20))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("digest is 20 bytes, but rsa-2048 signs a digest of 32 (SHA256) "
                             "or 48 (SHA384) or 64 (SHA512) bytes")
