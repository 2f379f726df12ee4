"""sigstore-kms-signerd run as cosign runs it: a subprocess found on PATH,
``v1`` and the JSON arguments in argv, the message on stdin, JSON on stdout.
Against a real daemon (in process, real mTLS, real SoftHSM) through a
client.toml in SIGNERCTL_CONFIG. Signatures are checked with ``cryptography``
the way sigstore's verifiers check them (pkg/signature: ECDSA ASN.1 over the
hashFunc digest, RSA PKCS#1 v1.5, pure Ed25519)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signerd.adapters.cosign import ALGORITHMS
from tests.adapter_helpers import RUNNER_READS_POLICY, closed_port, write_client_toml
from tests.conftest import Daemon, unique_gun

MESSAGE = b"cosign signs this payload\n" * 50
BIN = Path(sys.executable).parent
GO_HASH = {5: hashes.SHA256(), 6: hashes.SHA384(), 7: hashes.SHA512()}  # Go crypto.Hash
NO_RPC = {"keyVersion": "", "remoteVerification": False}  # what PackRPCOptions sends


def plugin_path() -> str:
    """The console script, found on PATH as cosign's exec.LookPath finds it."""
    found = shutil.which("sigstore-kms-signerd", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert found, "sigstore-kms-signerd is not installed: pip install -e '.[test]'"
    return found


def args(method: str, ref: str, member: dict[str, Any], hash_func: int | str = 5,
         deadline: str | None = None) -> dict[str, Any]:
    """PluginArgs as cliplugin serializes them (common/interface.go)."""
    init: dict[str, Any] = {"protocolVersion": "v1", "keyResourceID": ref,
                            "hashFunc": hash_func, "rpcOptions": NO_RPC}
    if deadline:
        init["ctxDeadline"] = deadline
    return {"initOptions": init, "methodName": method, method: member}


def sign_options(digest: bytes | None = None, hash_func: int | str | None = None) -> dict[str, Any]:
    """SignOptions/VerifyOptions as encoding.PackSignOptions writes them: SignMessage
    sends ``"digest": null``; the crypto.Signer path a digest and its hashFunc."""
    message: dict[str, Any] = {"digest": base64.b64encode(digest).decode() if digest else None}
    if hash_func is not None:
        message["hashFunc"] = hash_func
    return {"rpcOptions": NO_RPC, "messageOptions": message}


def run(config: Path, request: dict[str, Any] | str, stdin: bytes = b"",
        version: str = "v1") -> tuple[dict[str, Any], str]:
    """Run the plugin once; return its JSON response and its stderr."""
    argv = [plugin_path(), version, request if isinstance(request, str) else json.dumps(request)]
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, timeout=60,
        env={**os.environ, "SIGNERCTL_CONFIG": str(config)},
    )
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr, stderr
    response = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert isinstance(response, dict)
    assert proc.returncode == (1 if "errorMessage" in response else 0), (proc.returncode, response)
    return response, stderr


@pytest.fixture
def config(daemon: Daemon, tmp_path: Path) -> Path:
    return write_client_toml(daemon.client_config(), tmp_path / "client.toml")


def create(daemon: Daemon, algorithm: str) -> Any:
    with daemon.client() as c:
        return c.create_key(unique_gun(), "targets", algorithm, purpose="raw")


def verify_as_sigstore(pem: bytes, signature: bytes, message: bytes, hash_func: int = 5) -> None:
    """sigstore's verifiers, in cryptography: raises InvalidSignature."""
    public = serialization.load_pem_public_key(pem)
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, message)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, message, ec.ECDSA(GO_HASH[hash_func]))  # ecdsa.VerifyASN1
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, message, padding.PKCS1v15(), GO_HASH[hash_func])


def test_default_and_supported_algorithms(config: Path) -> None:
    # cosign asks these of a key it has not made yet: no signerd call needed.
    assert run(config, args("defaultAlgorithm", "x", {})) == (
        {"defaultAlgorithm": {"defaultAlgorithm": "ecdsa-sha2-256-nistp256"}}, "")
    response, _ = run(config, args("supportedAlgorithms", "x", {}))
    assert response == {"supportedAlgorithms": {"supportedAlgorithms": list(ALGORITHMS)}}
    assert "rsa-sign-pkcs1-2048-sha256" in list(ALGORITHMS) and "ed25519" in list(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ["", *ALGORITHMS])
def test_create_key_makes_one_key_per_gun_and_role(
    daemon: Daemon, config: Path, algorithm: str
) -> None:
    gun = unique_gun()
    ref = f"{gun}?role=targets/releases"
    response, stderr = run(config, args("createKey", ref, {"algorithm": algorithm}))
    pem = base64.b64decode(response["createKey"]["publicKeyPEM"])
    with daemon.client() as c:
        (key,) = c.list_keys(gun, "targets/releases")
    assert key.algorithm == ALGORITHMS[algorithm or "ecdsa-sha2-256-nistp256"]
    assert pem == key.public_key_pem.encode()
    assert f"signerd://{key.key_id}" in stderr  # the key reference to sign with
    # Again with the same reference: the same key, as other KMS plugins do.
    assert run(config, args("createKey", ref, {"algorithm": algorithm}))[0] == response
    # The GUN?role= reference names that key for the other methods too.
    assert run(config, args("publicKey", ref, {"publicKeyOptions": {"rpcOptions": NO_RPC}}))[0] == {
        "publicKey": {"publicKeyPEM": response["createKey"]["publicKeyPEM"]}}


def test_create_key_refuses_what_it_cannot_do(daemon: Daemon, config: Path) -> None:
    gun = unique_gun()
    run(config, args("createKey", f"{gun}?role=targets", {"algorithm": "ecdsa-p384"}))
    cases = {
        f"{gun}?role=targets": ("ed25519", "already has key"),  # another algorithm
        f"{unique_gun()}?role=targets ": ("", "invalid role"),
        f"{unique_gun()}?role=targets&x=1": ("", "GUN?role=ROLE"),
        create(daemon, "ecdsa-p256").key_id: ("", "createKey needs signerd://GUN?role=ROLE"),
        f"{unique_gun()}?role=snapshot": ("rsa-sign-pss-2048-sha256", "is not supported"),
    }
    for ref, (algorithm, message) in cases.items():
        response, _ = run(config, args("createKey", ref, {"algorithm": algorithm}))
        assert message in response["errorMessage"], (ref, response)


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"])
def test_public_key_sign_and_verify_a_message(daemon: Daemon, config: Path, algorithm: str) -> None:
    key = create(daemon, algorithm)
    response, _ = run(config, args("publicKey", key.key_id, {"publicKeyOptions": {}}))
    pem = base64.b64decode(response["publicKey"]["publicKeyPEM"])
    assert pem == key.public_key_pem.encode()

    # With a deadline as Go writes it (RFC 3339, nanoseconds): the call's timeout.
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S")
    response, _ = run(config, args("signMessage", key.key_id, {"signOptions": sign_options()},
                                   deadline=f"{soon}.123456789Z"), stdin=MESSAGE)
    signature = base64.b64decode(response["signMessage"]["signature"])
    verify_as_sigstore(pem, signature, MESSAGE)
    if algorithm.startswith("ecdsa"):
        utils.decode_dss_signature(signature)  # ASN.1 DER, not r||s

    verify = {"signature": response["signMessage"]["signature"], "verifyOptions": sign_options()}
    assert run(config, args("verifySignature", key.key_id, verify), stdin=MESSAGE)[0] == {
        "verifySignature": {}}
    response, _ = run(config, args("verifySignature", key.key_id, verify), stdin=MESSAGE + b"!")
    assert response == {
        "errorMessage": f"the signature does not verify with signerd key {key.key_id}"}


@pytest.mark.parametrize(("algorithm", "hash_func"),
                         [("ecdsa-p256", 5), ("ecdsa-p384", 5), ("ecdsa-p384", 6),
                          ("ecdsa-p256", 7), ("rsa-3072", 5)])
def test_sign_a_precomputed_digest_as_cosigns_crypto_signer(
    daemon: Daemon, config: Path, algorithm: str, hash_func: int
) -> None:
    key = create(daemon, algorithm)
    digest = hashlib.new(GO_HASH[hash_func].name, MESSAGE).digest()
    # CryptoSigner.Sign: empty stdin, messageOptions.digest and hashFunc
    # (initOptions.hashFunc stays cosign's SHA-256).
    options = sign_options(digest, hash_func)
    response, _ = run(config, args("signMessage", key.key_id, {"signOptions": options}))
    signature = base64.b64decode(response["signMessage"]["signature"])
    verify_as_sigstore(key.public_key_pem.encode(), signature, MESSAGE, hash_func)
    # Message mode with that hashFunc in initOptions makes a signature that
    # verifies the same way; both verify through the plugin too.
    response, _ = run(config, args("signMessage", key.key_id, {"signOptions": sign_options()},
                                   hash_func=hash_func), stdin=MESSAGE)
    from_message = base64.b64decode(response["signMessage"]["signature"])
    verify_as_sigstore(key.public_key_pem.encode(), from_message, MESSAGE, hash_func)
    for sig in (signature, from_message):
        verify = {"signature": base64.b64encode(sig).decode(), "verifyOptions": options}
        assert run(config, args("verifySignature", key.key_id, verify))[0] == {
            "verifySignature": {}}


def test_ed25519_in_the_crypto_signer_path_signs_the_message(daemon: Daemon, config: Path) -> None:
    # Go's crypto.Signer for Ed25519 gets the message itself and crypto.Hash(0);
    # cliplugin's CryptoSigner passes it as messageOptions.digest.
    key = create(daemon, "ed25519")
    options = sign_options(MESSAGE, 0)
    response, _ = run(config, args("signMessage", key.key_id, {"signOptions": options}))
    signature = base64.b64decode(response["signMessage"]["signature"])
    verify_as_sigstore(key.public_key_pem.encode(), signature, MESSAGE)
    verify = {"signature": response["signMessage"]["signature"], "verifyOptions": options}
    assert run(config, args("verifySignature", key.key_id, verify))[0] == {"verifySignature": {}}


def test_sign_refuses_what_the_key_cannot_sign(daemon: Daemon, config: Path) -> None:
    ed, rsa_key = create(daemon, "ed25519"), create(daemon, "rsa-2048")
    digest = hashlib.sha256(MESSAGE).digest()
    cases = [
        (ed.key_id, sign_options(digest, 5), "not a digest made with hashFunc 5"),
        (ed.key_id, {"messageOptions": {"digest": "%%%", "hashFunc": 0}}, "is not base64"),
        (rsa_key.key_id, sign_options(hashlib.sha512(MESSAGE).digest(), 7), "use SHA-256 (5)"),
        (rsa_key.key_id, sign_options(digest[:20], 5), "digest is 20 bytes"),
        (rsa_key.key_id, sign_options(None, 3), "hashFunc 3 (Go crypto.Hash) is not supported"),
        (rsa_key.key_id, sign_options(None, "five"), 'hashFunc "five" (Go crypto.Hash)'),
    ]
    for key_id, options, message in cases:
        response, _ = run(config, args("signMessage", key_id, {"signOptions": options}),
                          stdin=MESSAGE)
        assert message in response["errorMessage"], response
    # Regression: an initOptions.hashFunc that is not a number was reported as -1.
    response, _ = run(config, args("signMessage", rsa_key.key_id,
                                   {"signOptions": sign_options()}, hash_func="five"),
                      stdin=MESSAGE)
    assert 'hashFunc "five" (Go crypto.Hash) is not supported' in response["errorMessage"]


def test_errors_are_error_messages(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(policy=RUNNER_READS_POLICY)
    admin = write_client_toml(d.client_config(), tmp_path / "admin.toml")
    runner = write_client_toml(d.client_config("runner"), tmp_path / "runner.toml")
    nowhere = dataclasses.replace(d.client_config(), server=f"127.0.0.1:{closed_port()}")
    down = write_client_toml(nowhere, tmp_path / "down.toml")
    foreign = write_client_toml(d.client_config("foreign"), tmp_path / "foreign.toml")
    key = create(d, "ecdsa-p256")
    sign = args("signMessage", key.key_id, {"signOptions": sign_options()})
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat().replace("+00:00", "Z")

    cases: list[tuple[Path, dict[str, Any] | str, str, str]] = [
        (admin, args("publicKey", "ab" * 32, {}), "v1", "failed with NOT_FOUND"),
        (runner, sign, "v1", f"Sign {key.key_id} failed with PERMISSION_DENIED"),
        (down, sign, "v1", f"signerd at {nowhere.server}: GetKey"),
        (down, sign, "v1", "UNAVAILABLE (is signerd running"),
        # Regression: a client certificate signerd refuses asked "is signerd running".
        (foreign, sign, "v1", "UNAVAILABLE (the TLS handshake failed: Socket closed: signerd "
         "may not accept the client certificate; check the client config's ca, cert, key"),
        (tmp_path / "none.toml", sign, "v1", "no signerd client config at"),
        (admin, sign, "v2", "this plugin speaks v1"),
        (admin, args("decrypt", key.key_id, {}), "v1", "unsupported method 'decrypt'"),
        (admin, "{not json", "v1", "not JSON"),
        (admin, args("publicKey", "docker.io/acme/app", {}), "v1", "signerd://KEYID"),
        (admin, args("signMessage", key.key_id, {"signOptions": sign_options()}, deadline=past),
         "v1", "deadline"),
        (admin, args("publicKey", f"{unique_gun()}?role=targets", {}), "v1", "has no key"),
    ]
    for config, request, version, message in cases:
        response, _ = run(config, request, stdin=MESSAGE, version=version)
        assert list(response) == ["errorMessage"], response
        assert message in response["errorMessage"], (message, response)

