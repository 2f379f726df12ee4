"""Notation's signing plugin for signerd: the console script ``notation-signerd``.

The Notary Project plugin contract 1.0 (notaryproject/specifications
``specs/plugin-extensibility.md``): Notation runs
``notation-signerd <command>`` with a JSON request on stdin. A success is one
JSON object on stdout and exit status 0; a failure is exit status 1 and
``{"errorCode", "errorMessage"}`` on stderr. Nothing else is ever written to
either stream: file descriptors 1 and 2 point at /dev/null while the command
runs (what notation-plugin-framework-go's ``deferStdout`` does), so no
library or gRPC log can corrupt the answer. Unknown request attributes are
ignored, as the contract requires for minor versions.

Commands (capability ``SIGNATURE_GENERATOR.RAW``):

- ``get-plugin-metadata``: name ``signerd`` (the plugin's directory and
  ``notation-signerd``), description, version, url,
  ``supportedContractVersions`` ``["1.0"]``, capabilities. No signerd call.
- ``describe-key`` ``{contractVersion, keyId, pluginConfig?}`` →
  ``{keyId, keySpec}``: ``keyId`` is signerd's key ID (64 hex digits);
  ``keySpec`` follows the key's algorithm (GetKey): ecdsa-p256 ``EC-256``,
  ecdsa-p384 ``EC-384``, rsa-2048/3072/4096 ``RSA-2048``/``-3072``/``-4096``.
  Ed25519 keys are refused (VALIDATION_ERROR): Notation has no Ed25519.
- ``generate-signature`` ``{contractVersion, keyId, keySpec, hashAlgorithm,
  payload, pluginConfig?}`` → ``{keyId, signature, signingAlgorithm,
  certificateChain}``. The payload (base64; Notation's JWS signing input) is
  hashed here with ``hashAlgorithm``, which must be the key spec's
  (signature-specification.md, "Algorithm Selection": EC-256 SHA-256,
  EC-384 SHA-384, RSA-2048 SHA-256, RSA-3072 SHA-384, RSA-4096 SHA-512),
  and only the digest goes to signerd (Sign). ECDSA signatures are raw
  r||s, as JWS ES256/ES384 carry them (RFC 7518 §3.4); RSA is RSASSA-PSS
  with MGF1 of the same hash and a salt as long as the hash (PS256/384/512,
  RFC 7518 §3.5, which notation-core-go verifies; go-cose, for COSE, requires
  exactly that salt). ``certificateChain`` is the key's chain from signerd
  (GetCertificateChain: ``signerctl keys certify``), base64 DER, leaf first.
  Before anything is signed the leaf must hold the key, match ``keySpec``,
  be valid now and be a code-signing certificate; the signature is checked
  against the leaf before it is returned.

Connection: signerctl's client config: ``pluginConfig.config`` if given,
else ``$SIGNERCTL_CONFIG``, else the embedded daemon's ``client.toml``.
``pluginConfig`` keys (``notation key add --plugin-config KEY=VALUE``, or
``notation sign --plugin-config``):

- ``config``: path of a signerctl client config (server, ca, cert, key,
  server_name, timeout). Paths only: the TLS key stays in its file.
- ``timeout``: seconds per signerd call (default: the client config's).

Other keys are refused (VALIDATION_ERROR), so a misspelt one is not ignored.

Errors (``errorCode``): VALIDATION_ERROR for a malformed request (bad JSON,
a missing or malformed attribute, a key spec or hash signerd does not do,
unknown pluginConfig keys) and for a key signerd does not have, or one the
caller may not read (NOT_FOUND, as the contract says) or a request signerd finds malformed
(INVALID_ARGUMENT); UNSUPPORTED_CONTRACT_VERSION for a contract version
other than 1.x; ACCESS_DENIED when signerd's policy refuses the caller
(PERMISSION_DENIED) or cannot identify it (UNAUTHENTICATED); TIMEOUT when a
call outlives its deadline (DEADLINE_EXCEEDED); THROTTLED for
RESOURCE_EXHAUSTED; ERROR for everything else: no client config, signerd
unreachable (UNAVAILABLE), a key without a usable certificate
(FAILED_PRECONDITION), an expired or non-code-signing certificate.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signerd import certs
from signerd.adapters import _remote
from signerd.client import Client, ClientConfig
from signerd.errors import ConfigError, InvalidArgument, quoted
from signerd.keys import validate_key_id

NAME = "signerd"
DESCRIPTION = "Signs with keys on PKCS#11 tokens (HSM, YubiHSM 2, TPM) through signerd"
CONTRACT_VERSION = "1.0"
CAPABILITIES = ("SIGNATURE_GENERATOR.RAW",)

VALIDATION_ERROR = "VALIDATION_ERROR"
UNSUPPORTED_CONTRACT_VERSION = "UNSUPPORTED_CONTRACT_VERSION"
ACCESS_DENIED = "ACCESS_DENIED"
TIMEOUT = "TIMEOUT"
THROTTLED = "THROTTLED"
ERROR = "ERROR"

# signerd algorithm → Notary Project key spec (signature-specification.md,
# "Algorithm Selection"; plugin-extensibility.md, describe-key).
KEY_SPECS = {
    "ecdsa-p256": "EC-256",
    "ecdsa-p384": "EC-384",
    "rsa-2048": "RSA-2048",
    "rsa-3072": "RSA-3072",
    "rsa-4096": "RSA-4096",
}
# key spec → (hashAlgorithm, signingAlgorithm), from the same table.
SPEC_ALGORITHMS = {
    "EC-256": ("SHA-256", "ECDSA-SHA-256"),
    "EC-384": ("SHA-384", "ECDSA-SHA-384"),
    "RSA-2048": ("SHA-256", "RSASSA-PSS-SHA-256"),
    "RSA-3072": ("SHA-384", "RSASSA-PSS-SHA-384"),
    "RSA-4096": ("SHA-512", "RSASSA-PSS-SHA-512"),
}
_ALL_SPECS = ("RSA-2048", "RSA-3072", "RSA-4096", "EC-256", "EC-384", "EC-521")
HASHES: dict[str, hashes.HashAlgorithm] = {
    "SHA-256": hashes.SHA256(), "SHA-384": hashes.SHA384(), "SHA-512": hashes.SHA512()}
PLUGIN_CONFIG_KEYS = ("config", "timeout")
# gRPC status (signerd) → errorCode (plugin-extensibility.md, "Error codes
# for describe-key and generate-signature").
_STATUS_CODES = {
    "INVALID_ARGUMENT": VALIDATION_ERROR,
    "NOT_FOUND": VALIDATION_ERROR,
    "PERMISSION_DENIED": ACCESS_DENIED,
    "UNAUTHENTICATED": ACCESS_DENIED,
    "DEADLINE_EXCEEDED": TIMEOUT,
    "RESOURCE_EXHAUSTED": THROTTLED,
}
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.+-]+)?$")


class PluginError(Exception):
    """A failure to report to Notation: ``code`` is the contract's errorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- requests -----------------------------------------------------------------


def _string(request: Mapping[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise PluginError(VALIDATION_ERROR, f"{name} is required (a non-empty string)")
    return value


def check_contract_version(request: Mapping[str, Any]) -> None:
    """Accept contract 1.x: minor versions only add attributes, which are
    ignored. Raises PluginError: VALIDATION_ERROR when it is missing,
    UNSUPPORTED_CONTRACT_VERSION for any other version."""
    version = _string(request, "contractVersion")
    major, _, minor = version.partition(".")
    if major != CONTRACT_VERSION.split(".")[0] or not minor.isdigit():
        raise PluginError(
            UNSUPPORTED_CONTRACT_VERSION,
            f"{version!r} is not a supported Notation plugin contract version; "
            f"notation-signerd supports {CONTRACT_VERSION}")


def plugin_config(request: Mapping[str, Any]) -> dict[str, str]:
    """The request's ``pluginConfig`` (a string map), checked against
    PLUGIN_CONFIG_KEYS. Raises PluginError (VALIDATION_ERROR)."""
    config = request.get("pluginConfig")
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise PluginError(VALIDATION_ERROR, "pluginConfig must be a map of strings")
    unknown = sorted(set(config) - set(PLUGIN_CONFIG_KEYS))
    if unknown:
        raise PluginError(
            VALIDATION_ERROR,
            f"unknown pluginConfig key(s) {', '.join(unknown)}; notation-signerd takes "
            f"{' and '.join(PLUGIN_CONFIG_KEYS)}")
    return dict(config)


def client_config(config: Mapping[str, str]) -> ClientConfig:
    """signerctl's client config (``config`` key, $SIGNERCTL_CONFIG, or the
    embedded daemon's), with the ``timeout`` key applied.

    Raises PluginError: VALIDATION_ERROR for a bad timeout, ERROR for a
    missing or unusable config file."""
    timeout: float | None = None
    if "timeout" in config:
        try:
            timeout = float(config["timeout"])
        except ValueError:
            timeout = None
        if timeout is None or not 0 < timeout <= 3600:
            raise PluginError(
                VALIDATION_ERROR,
                f"pluginConfig timeout {quoted(config['timeout'])} must be seconds, "
                "more than 0 and at most 3600")
    try:
        cfg = _remote.load_client_config(Path(config["config"]) if "config" in config else None)
    except ConfigError as e:
        raise PluginError(ERROR, str(e)) from None
    return dataclasses.replace(cfg, timeout=timeout) if timeout is not None else cfg


@contextmanager
def _signerd(cfg: ClientConfig, call: str) -> Iterator[Client]:
    """A client for one signerd call; failures become PluginError with the
    errorCode their gRPC status maps to."""
    try:
        with _remote.calling(cfg, call) as client:
            yield client
    except _remote.RemoteError as e:
        raise PluginError(_STATUS_CODES.get(e.status, ERROR), str(e)) from None
    except ConfigError as e:
        raise PluginError(ERROR, str(e)) from None


def _key_id(request: Mapping[str, Any]) -> str:
    key_id = _string(request, "keyId")
    try:
        validate_key_id(key_id)
    except InvalidArgument:
        raise PluginError(
            VALIDATION_ERROR,
            f"keyId {quoted(key_id)} is not a signerd key ID (64 lowercase hex digits, "
            "as 'signerctl keys list' shows them)") from None
    return key_id


# -- commands -----------------------------------------------------------------


def _version() -> str:
    from signerd import version

    found = version()
    return found if _SEMVER.match(found) else "0.0.0"  # Notation compares SemVer


def _url() -> str:
    """Where signerd is documented: the package metadata's Project-URL or
    Home-page when it names one, else this installation's own files (the
    checkout's README.md, or the installed package), as a file: URL.
    signerd is on no package index, so an index page under its name would be
    anyone's to claim."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("signerd")
    except PackageNotFoundError:
        meta = None
    if meta is not None:
        for entry in meta.get_all("Project-URL") or []:
            _, _, url = str(entry).partition(",")
            if url.strip():
                return url.strip()
        home = meta.get_all("Home-page") or []
        if home and str(home[0]).strip():
            return str(home[0]).strip()
    package = Path(__file__).resolve().parent.parent
    readme = package.parent / "README.md"
    return (readme if readme.is_file() else package).as_uri()


def get_plugin_metadata(request: Mapping[str, Any]) -> dict[str, Any]:
    """``get-plugin-metadata``: static, no signerd call (the contract asks
    for none, since Notation runs it for every signature)."""
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "version": _version(),
        "url": _url(),
        "supportedContractVersions": [CONTRACT_VERSION],
        "capabilities": list(CAPABILITIES),
    }


def describe_key(request: Mapping[str, Any]) -> dict[str, Any]:
    """``describe-key``: the key's spec, from its algorithm (GetKey)."""
    check_contract_version(request)
    key_id = _key_id(request)
    cfg = client_config(plugin_config(request))
    with _signerd(cfg, f"GetKey {key_id}") as client:
        key = client.get_key(key_id)
    spec = KEY_SPECS.get(key.algorithm)
    if spec is None:
        raise PluginError(
            VALIDATION_ERROR,
            f"key {key_id} is {key.algorithm}, which Notation cannot use; it signs with "
            f"{', '.join(KEY_SPECS)} keys")
    return {"keyId": key_id, "keySpec": spec}


def key_spec_of(cert: x509.Certificate) -> str:
    """The key spec of a certificate's public key ("EC-256", "RSA-3072"...)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return f"EC-{public.curve.key_size}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA-{public.key_size}"
    return type(public).__name__


def _check_leaf(key_id: str, leaf: x509.Certificate, key_spec: str) -> None:
    actual = key_spec_of(leaf)
    if actual != key_spec:
        raise PluginError(VALIDATION_ERROR,
                          f"key {key_id} is {actual}, but the request says keySpec {key_spec}")
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PluginError(
            ERROR,
            f"the certificate of key {key_id} is valid from {leaf.not_valid_before_utc:%Y-%m-%d} "
            f"to {leaf.not_valid_after_utc:%Y-%m-%d}, not now; certify the key again")
    problems = certs.code_signing_problems(leaf)
    if problems:
        raise PluginError(
            ERROR,
            f"the certificate of key {key_id} is not a code-signing certificate "
            f"({'; '.join(problems)}); issue one with 'signerctl keys certify {key_id} "
            "--subject ... --issuer-key CA_KEYID'")


def verify_signature(leaf: x509.Certificate, signature: bytes, payload: bytes,
                     hash_name: str) -> None:
    """Verify a raw signature the way Notation does before it builds the
    envelope (plugin-extensibility.md, signing workflow step 4.2): with the
    leaf's public key, ECDSA raw r||s over ``hash_name`` of the payload,
    RSASSA-PSS with MGF1 of that hash and a salt as long as it. Raises
    InvalidSignature."""
    chosen = HASHES[hash_name]
    public = leaf.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        if len(signature) != 2 * size:
            raise InvalidSignature(f"an ECDSA signature is {2 * size} bytes r||s")
        der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                         int.from_bytes(signature[size:], "big"))
        public.verify(der, payload, ec.ECDSA(chosen))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, payload,
                      padding.PSS(mgf=padding.MGF1(chosen), salt_length=chosen.digest_size),
                      chosen)
    else:
        raise InvalidSignature(f"unsupported public key {type(public).__name__}")


def generate_signature(request: Mapping[str, Any]) -> dict[str, Any]:
    """``generate-signature``: hash the payload, have signerd sign the digest,
    answer with the signature and the key's certificate chain."""
    check_contract_version(request)
    key_id = _key_id(request)
    key_spec = _string(request, "keySpec")
    if key_spec not in SPEC_ALGORITHMS:
        known = "is not a key spec" if key_spec not in _ALL_SPECS else "is not supported"
        raise PluginError(VALIDATION_ERROR,
                          f"keySpec {quoted(key_spec)} {known}; signerd signs with "
                          f"{', '.join(SPEC_ALGORITHMS)}")
    hash_name, signing_algorithm = SPEC_ALGORITHMS[key_spec]
    requested_hash = _string(request, "hashAlgorithm")
    if requested_hash != hash_name:
        raise PluginError(VALIDATION_ERROR,
                          f"hashAlgorithm {quoted(requested_hash)} does not go with keySpec "
                          f"{key_spec}, which signs with {hash_name}")
    try:
        payload = base64.b64decode(_string(request, "payload"), validate=True)
    except (binascii.Error, ValueError):
        raise PluginError(VALIDATION_ERROR, "payload is not base64") from None
    if not payload:
        raise PluginError(VALIDATION_ERROR, "payload is empty")
    cfg = client_config(plugin_config(request))
    # The chain first: a key that cannot make a usable signature signs nothing.
    with _signerd(cfg, f"GetCertificateChain {key_id}") as client:
        chain = client.certificate_chain(key_id)
    try:
        leaf = certs.load(chain[0])
    except (IndexError, ValueError) as e:
        raise PluginError(
            ERROR, f"signerd returned no usable certificate for {key_id}: {e}") from None
    _check_leaf(key_id, leaf, key_spec)
    digest = hashes.Hash(HASHES[hash_name])
    digest.update(payload)
    with _signerd(cfg, f"Sign {key_id}") as client:
        signature = client.sign(key_id, digest=digest.finalize(), encoding="raw",
                                rsa_padding="pss").signature
    try:
        verify_signature(leaf, signature, payload, hash_name)
    except InvalidSignature as e:
        raise PluginError(
            ERROR, f"the signature of key {key_id} does not verify with its certificate: {e}"
        ) from None
    return {
        "keyId": key_id,
        "signature": base64.b64encode(signature).decode(),
        "signingAlgorithm": signing_algorithm,
        "certificateChain": [base64.b64encode(der).decode() for der in chain],
    }


COMMANDS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "get-plugin-metadata": get_plugin_metadata,
    "describe-key": describe_key,
    "generate-signature": generate_signature,
}


def run(argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    """One plugin invocation: (exit status, stdout, stderr). Never raises."""
    try:
        if len(argv) != 1 or argv[0] not in COMMANDS:
            raise PluginError(
                VALIDATION_ERROR,
                f"usage: notation-signerd <{'|'.join(COMMANDS)}> with the JSON request on stdin")
        command = argv[0]
        text = stdin.strip()
        if not text and command == "get-plugin-metadata":
            text = b"{}"
        try:
            request = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise PluginError(VALIDATION_ERROR, f"the request is not valid JSON: {e}") from None
        if not isinstance(request, dict):
            raise PluginError(VALIDATION_ERROR, "the request must be a JSON object")
        response = COMMANDS[command](request)
        return 0, json.dumps(response).encode(), b""
    except PluginError as e:
        error = {"errorCode": e.code, "errorMessage": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure must reach Notation as JSON
        error = {"errorCode": ERROR, "errorMessage": f"internal error: {type(e).__name__}: {e}"}
    return 1, b"", json.dumps(error).encode()


@contextmanager
def _silenced() -> Iterator[tuple[int, int]]:
    """Point file descriptors 1 and 2 at /dev/null for good, and yield
    duplicates of the original ones: only the answer may reach Notation,
    not a library's output, nor gRPC's logs at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield saved
    finally:
        for fd in saved:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def main(argv: list[str] | None = None) -> int:
    """The console script: takes over the process's stdout and stderr (see
    :func:`_silenced`), so it is not for calling inside another program."""
    args = sys.argv[1:] if argv is None else argv
    with _silenced() as (out, err):
        status, stdout, stderr = run(args, sys.stdin.buffer.read())
        _write_all(out, stdout)
        _write_all(err, stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
