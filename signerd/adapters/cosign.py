"""cosign's KMS plugin for signerd: the console script ``sigstore-kms-signerd``.

cosign (through sigstore's ``pkg/signature/kms/cliplugin``, protocol ``v1``)
runs ``sigstore-kms-signerd`` for keys written ``signerd://<ref>``, once per
method, as ``sigstore-kms-signerd v1 '<JSON>'``: the JSON holds
``initOptions`` (``protocolVersion``, ``keyResourceID`` = ``<ref>``,
``hashFunc`` as a Go ``crypto.Hash`` number, optional ``ctxDeadline``,
``rpcOptions``), ``methodName``, and one member named after the method. The
message to sign or verify is on stdin. The answer is one JSON object on
stdout, ``{"<method>": {...}}`` or ``{"errorMessage": "..."}``; cosign ignores
the exit status (this plugin exits 1 on errors) and shows stderr to the user.
No traceback is ever printed: every failure becomes ``errorMessage``.

Key references (``<ref>``):

- ``signerd://KEYID``: signerd's key ID (64 hex), for every method but createKey.
- ``signerd://GUN?role=ROLE[&token=NAME]``, e.g.
  ``signerd://docker.io/acme/app?role=targets/releases``: createKey makes a key
  for that GUN and TUF role (on the daemon's default token for the role, or
  ``NAME``) unless it already has exactly one of that algorithm, which it
  returns, as sigstore's example plugin returns an existing key. The other
  methods use the GUN and role's only key, and ask for ``signerd://KEYID``
  when it has several. createKey prints the new key's ID on stderr.

Keys are **raw** keys (signerd.keys.PURPOSES): createKey makes raw keys, and a
GUN and role's metadata keys (which sign only checked TUF/Notary metadata) are
not cosign's. A key made before purposes is set raw once with ``signerctl
keys set-purpose KEYID raw``.

Methods: ``defaultAlgorithm`` (``ecdsa-sha2-256-nistp256``),
``supportedAlgorithms``, ``createKey`` and ``publicKey`` (``publicKeyPEM``:
base64 of the PEM SubjectPublicKeyInfo), ``signMessage`` (``signature``,
base64), ``verifySignature`` (checked here with ``cryptography``, against the
key signerd returns). signMessage and verifySignature take either the message
on stdin, hashed here with ``hashFunc`` (``messageOptions.hashFunc`` if
given, else ``initOptions.hashFunc``), or, as cosign's crypto.Signer path
does, empty stdin and a precomputed ``messageOptions.digest``; only the
digest goes to signerd. Ed25519 signs the message itself: on stdin, or, in
the crypto.Signer path, as ``messageOptions.digest`` with ``hashFunc`` 0 (Go's
convention for Ed25519's ``Sign``); Ed25519ph is not supported.

Algorithms (sigstore's names, ``pkg/signature/algorithm_registry.go``;
createKey also takes signerd's names and ``ecdsa-p256-sha256``/``ecdsa-p384-sha384``)::

    ecdsa-sha2-256-nistp256     ecdsa-p256   ASN.1 DER ECDSA; SHA-256, -384 or -512
    ecdsa-sha2-384-nistp384     ecdsa-p384   ASN.1 DER ECDSA; SHA-256, -384 or -512
    rsa-sign-pkcs1-2048-sha256  rsa-2048     RSASSA-PKCS1-v1_5, SHA-256 only
    rsa-sign-pkcs1-3072-sha256  rsa-3072
    rsa-sign-pkcs1-4096-sha256  rsa-4096
    ed25519                     ed25519      pure Ed25519 over the message (no digests)

RSA signs PKCS#1 v1.5 because that is what sigstore's ``LoadVerifier``
checks RSA public keys with (``cosign verify --key cosign.pub``); there is
no RSA-PSS. An ECDSA digest longer than the curve is cut to its leftmost
curve-size bytes before signing, which is what ECDSA itself does with it
(FIPS 186-5 section 6.4.1), so the signature verifies with that hash.

Connection: signerctl's client config, ``$SIGNERCTL_CONFIG`` or else the
embedded daemon's ``client.toml``. A ``ctxDeadline`` from cosign shortens the
config's timeout. Secrets are never taken from the JSON (sigstore sends none).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib import parse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signerd import keys
from signerd.adapters import _remote
from signerd.client import Client, ClientConfig
from signerd.errors import InvalidArgument, SignerdError, quoted
from signerd.keys import Algorithm, KeyID
from signerd.v1 import signer_pb2 as pb

PROTOCOL_VERSION = "v1"
DEFAULT_ALGORITHM = "ecdsa-sha2-256-nistp256"
# sigstore's algorithm names (pkg/signature/algorithm_registry.go) → signerd's.
ALGORITHMS = {
    "ecdsa-sha2-256-nistp256": "ecdsa-p256",
    "ecdsa-sha2-384-nistp384": "ecdsa-p384",
    "rsa-sign-pkcs1-2048-sha256": "rsa-2048",
    "rsa-sign-pkcs1-3072-sha256": "rsa-3072",
    "rsa-sign-pkcs1-4096-sha256": "rsa-4096",
    "ed25519": "ed25519",
}
# Also accepted by createKey: sigstore's GCP KMS names, and signerd's own.
_ALIASES = {
    "ecdsa-p256-sha256": "ecdsa-p256",
    "ecdsa-p384-sha384": "ecdsa-p384",
    **{name: name for name in keys.ALGORITHMS},
}
# Go crypto.Hash numbers (pkg.go.dev/crypto#Hash), as hashFunc carries them.
HASHES: dict[int, hashes.HashAlgorithm] = {
    5: hashes.SHA256(),
    6: hashes.SHA384(),
    7: hashes.SHA512(),
}


class PluginError(Exception):
    """A request this plugin refuses; the message goes to cosign as errorMessage."""


@dataclass(frozen=True)
class KeyRef:
    """``signerd://KEYID`` (key_id set) or ``signerd://GUN?role=ROLE[&token=NAME]``."""

    key_id: KeyID | None = None
    gun: str = ""
    role: str = ""
    token: str = ""

    def __str__(self) -> str:
        return f"signerd://{self.key_id}" if self.key_id else f"{self.gun} role {self.role}"


def parse_key_ref(ref: str) -> KeyRef:
    """Parse cosign's ``keyResourceID`` (the part after ``signerd://``).

    Raises PluginError, or InvalidArgument for a malformed GUN or role.
    """
    if "?" not in ref:
        try:
            return KeyRef(key_id=keys.validate_key_id(ref))
        except InvalidArgument:
            raise PluginError(
                f"key reference {quoted('signerd://' + ref)}: use signerd://KEYID (signerd's "
                "64-hex key ID) or signerd://GUN?role=ROLE"
            ) from None
    gun, _, query = ref.partition("?")
    try:
        params = parse.parse_qs(query, strict_parsing=True)
    except ValueError:
        raise PluginError(f"key reference {quoted('signerd://' + ref)}: bad query "
                          f"{quoted(query)}") from None
    unknown = sorted(set(params) - {"role", "token"})
    if unknown or len(params.get("role", [])) != 1 or len(params.get("token", [""])) != 1:
        raise PluginError(
            f"key reference {quoted('signerd://' + ref)}: use "
            "signerd://GUN?role=ROLE[&token=NAME]"
        )
    return KeyRef(
        gun=keys.validate_gun(gun),
        role=keys.validate_role(params["role"][0]),
        token=params.get("token", [""])[0],
    )


def signerd_algorithm(name: str) -> str:
    """signerd's algorithm for a sigstore algorithm name; empty means the default."""
    found = ALGORITHMS.get(name or DEFAULT_ALGORITHM) or _ALIASES.get(name)
    if found is None:
        raise PluginError(
            f"algorithm {name!r} is not supported; use one of: {', '.join(ALGORITHMS)} "
            "(RSA keys sign PKCS#1 v1.5, as cosign verifies RSA public keys)"
        )
    return found


def _raw(keys_: Iterable[pb.Key]) -> list[pb.Key]:
    """The raw keys among ``keys_``: cosign signs with raw keys only (a metadata key of
    the same GUN and role signs TUF/Notary metadata, and signerd refuses it anything else)."""
    return [k for k in keys_ if k.purpose == pb.KEY_PURPOSE_RAW]


def _obj(value: Any, where: str) -> dict[str, Any]:
    """A JSON object member; null or absent is {} (Go's nil pointers)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PluginError(f"{where} must be a JSON object")
    return value


def _deadlines(value: Any) -> Iterator[dt.datetime]:
    """Every ``ctxDeadline`` (RFC 3339, Go's time.Time JSON) anywhere in the request."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "ctxDeadline" and isinstance(v, str):
                try:
                    yield dt.datetime.fromisoformat(v)
                except ValueError:
                    raise PluginError(f"ctxDeadline {v!r} is not RFC 3339") from None
            else:
                yield from _deadlines(v)


@dataclass(frozen=True)
class Message:
    """What to sign or verify: the digest (None for Ed25519) and, for Ed25519, the message."""

    digest: bytes | None
    hash: hashes.HashAlgorithm | None
    message: bytes = b""


class Plugin:
    """One method call against signerd for one key reference."""

    def __init__(self, ref: KeyRef, hash_func: object, cfg: ClientConfig) -> None:
        self.ref = ref
        self.hash_func = hash_func
        self.cfg = cfg
        self.client = Client(cfg)
        self._key: pb.Key | None = None

    def call(self, name: str) -> AbstractContextManager[None]:
        """Context for one signerd.v1 call: failures name the status."""
        return _remote.rpc(self.cfg, name)

    def key(self) -> pb.Key:
        """The signerd.v1 Key the reference names (GetKey, or ListKeys for GUN?role=)."""
        if self._key is not None:
            return self._key
        if self.ref.key_id:
            with self.call(f"GetKey {self.ref.key_id}"):
                self._key = self.client.get_key(self.ref.key_id)
            return self._key
        with self.call(f"ListKeys {self.ref}"):
            listed = list(self.client.list_keys(self.ref.gun, self.ref.role, self.ref.token))
        found = _raw(listed)
        if not found and listed:
            ids = ", ".join(k.key_id for k in listed)
            raise PluginError(
                f"{self.ref} has only metadata keys ({ids}), which sign TUF/Notary metadata, "
                "not cosign payloads: make a raw key with cosign generate-key-pair, or "
                "'signerctl keys set-purpose KEYID raw' a key that was cosign's"
            )
        if not found:
            raise PluginError(
                f"{self.ref} has no key: create one with cosign generate-key-pair "
                f"--kms 'signerd://{self.ref.gun}?role={self.ref.role}'"
            )
        if len(found) > 1:
            ids = ", ".join(k.key_id for k in found)
            raise PluginError(f"{self.ref} has {len(found)} keys ({ids}): use signerd://KEYID")
        self._key = found[0]
        return self._key

    def create_key(self, algorithm: str) -> pb.Key:
        """createKey: the GUN and role's key of ``algorithm``, made if it has none."""
        if self.ref.key_id:
            raise PluginError(
                "createKey needs signerd://GUN?role=ROLE (signerd chooses key IDs), "
                f"not {self.ref}"
            )
        wanted = signerd_algorithm(algorithm)
        with self.call(f"ListKeys {self.ref}"):
            found = _raw(self.client.list_keys(self.ref.gun, self.ref.role, self.ref.token))
        if found and (len(found) > 1 or found[0].algorithm != wanted):
            raise PluginError(
                f"{self.ref} already has key(s) "
                f"{', '.join(f'{k.key_id} ({k.algorithm})' for k in found)}; "
                "sign with signerd://KEYID"
            )
        if found:
            key = found[0]
        else:
            with self.call(f"CreateKey {self.ref}"):
                key = self.client.create_key(self.ref.gun, self.ref.role, wanted, self.ref.token,
                                             purpose="raw")
        print(
            f"sigstore-kms-signerd: key {key.key_id} ({key.algorithm}) for {key.gun} "
            f"role {key.role} on token {key.token}; key reference signerd://{key.key_id}",
            file=sys.stderr,
        )
        return key

    def message(self, alg: Algorithm, stdin: BinaryIO, options: dict[str, Any]) -> Message:
        """The digest (or, for Ed25519, the message) of a sign or verify request."""
        message_options = _obj(options.get("messageOptions"), "messageOptions")
        digest_b64 = message_options.get("digest")
        if alg.keytype == "ed25519":
            if not digest_b64:
                return Message(None, None, stdin.read())
            # Go's crypto.Signer convention: Ed25519 Sign gets the message
            # itself with crypto.Hash(0), and cliplugin passes it as the digest.
            if message_options.get("hashFunc") != 0:
                raise PluginError(
                    "ed25519 keys sign whole messages (pure EdDSA), not a digest made with "
                    f"hashFunc {json.dumps(message_options.get('hashFunc'))}"
                )
            return Message(None, None, _b64decode(digest_b64, "messageOptions.digest"))
        number = message_options.get("hashFunc")
        if number is None:  # absent (Go's nil): the hashFunc cosign loaded the key with
            number = self.hash_func
        chosen = HASHES.get(number) if isinstance(number, int) else None
        if chosen is None or (alg.keytype == "rsa" and chosen.name != "sha256"):
            accepted = "SHA-256 (5)"
            if alg.keytype == "ecdsa":
                accepted += ", SHA-384 (6) or SHA-512 (7)"
            raise PluginError(
                f"hashFunc {json.dumps(number)} (Go crypto.Hash) is not supported for "
                f"{alg.name}; "
                f"use {accepted}"
            )
        if digest_b64:
            digest = _b64decode(digest_b64, "messageOptions.digest")
            if len(digest) != chosen.digest_size:
                raise PluginError(
                    f"digest is {len(digest)} bytes, but {chosen.name.upper()} digests are "
                    f"{chosen.digest_size}"
                )
            return Message(digest, chosen)
        hasher = hashlib.new(chosen.name)
        while chunk := stdin.read(1 << 20):
            hasher.update(chunk)
        return Message(hasher.digest(), chosen)

    def sign(self, stdin: BinaryIO, options: dict[str, Any]) -> bytes:
        """signMessage: DER ECDSA, PKCS#1 v1.5 RSA or Ed25519 signature bytes."""
        key = self.key()
        alg = keys.parse_algorithm(key.algorithm)
        msg = self.message(alg, stdin, options)
        with self.call(f"Sign {key.key_id}"):
            if msg.digest is None:
                resp = self.client.sign(key.key_id, message=msg.message)
            else:
                # ECDSA signs the leftmost curve-size bytes of a longer digest
                # (FIPS 186-5 6.4.1); signerd takes digests up to the curve size.
                digest = msg.digest[: alg.bits // 8] if alg.keytype == "ecdsa" else msg.digest
                resp = self.client.sign(
                    key.key_id, digest=digest, encoding="der", rsa_padding="pkcs1v15"
                )
        return bytes(resp.signature)

    def verify(self, signature: bytes, stdin: BinaryIO, options: dict[str, Any]) -> None:
        """verifySignature: as sigstore's verifiers do (ECDSA ASN.1, RSA PKCS#1 v1.5,
        Ed25519), with signerd's public key. Raises PluginError if it does not verify."""
        key = self.key()
        alg = keys.parse_algorithm(key.algorithm)
        msg = self.message(alg, stdin, options)
        public = keys.load_public_key(key.public_key_der)
        try:
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, msg.message)
            else:
                assert msg.digest is not None and msg.hash is not None
                prehashed = utils.Prehashed(msg.hash)
                if isinstance(public, ec.EllipticCurvePublicKey):
                    public.verify(signature, msg.digest, ec.ECDSA(prehashed))
                elif isinstance(public, rsa.RSAPublicKey):
                    public.verify(signature, msg.digest, padding.PKCS1v15(), prehashed)
        except InvalidSignature:
            raise PluginError(
                f"the signature does not verify with signerd key {key.key_id}"
            ) from None


def _timeout(cfg: ClientConfig, request: dict[str, Any]) -> ClientConfig:
    """The client config with its timeout cut to cosign's earliest ctxDeadline."""
    deadlines = list(_deadlines(request))
    if not deadlines:
        return cfg
    earliest = min(d if d.tzinfo else d.replace(tzinfo=dt.UTC) for d in deadlines)
    left = (earliest - dt.datetime.now(dt.UTC)).total_seconds()
    if left <= 0:
        raise PluginError(f"cosign's deadline {earliest.isoformat()} has passed")
    return dataclasses.replace(cfg, timeout=min(cfg.timeout, left))


def handle(argv: list[str], stdin: BinaryIO) -> dict[str, Any]:
    """Answer one plugin call: ``argv`` is ``["v1", "<JSON>"]``, ``stdin`` the
    message. Returns the response object; raises PluginError or SignerdError."""
    if len(argv) < 2:
        raise PluginError(
            "usage: sigstore-kms-signerd v1 '<JSON>' (cosign runs it for signerd:// keys)"
        )
    if argv[0] != PROTOCOL_VERSION:
        raise PluginError(f"protocol version {argv[0]!r}: this plugin speaks {PROTOCOL_VERSION}")
    try:
        request = _obj(json.loads(argv[1]), "the plugin arguments")
    except json.JSONDecodeError as e:
        raise PluginError(f"the plugin arguments are not JSON: {e}") from None
    init = _obj(request.get("initOptions"), "initOptions")
    if init.get("protocolVersion", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise PluginError(
            f"initOptions.protocolVersion {init.get('protocolVersion')!r}: "
            f"this plugin speaks {PROTOCOL_VERSION}"
        )
    method = request.get("methodName")
    args = _obj(request.get(method) if isinstance(method, str) else None, str(method))
    if method == "defaultAlgorithm":
        return {"defaultAlgorithm": {"defaultAlgorithm": DEFAULT_ALGORITHM}}
    if method == "supportedAlgorithms":
        return {"supportedAlgorithms": {"supportedAlgorithms": list(ALGORITHMS)}}
    if method not in ("createKey", "publicKey", "signMessage", "verifySignature"):
        raise PluginError(f"unsupported method {method!r}")
    ref = parse_key_ref(str(init.get("keyResourceID", "")))
    cfg = _timeout(_remote.load_client_config(), request)
    # As given (a bad one is reported as it was sent, when a message needs it).
    plugin = Plugin(ref, init.get("hashFunc", 0), cfg)
    try:
        if method == "createKey":
            key = plugin.create_key(str(args.get("algorithm", "")))
            return {"createKey": {"publicKeyPEM": _b64(key.public_key_pem.encode())}}
        if method == "publicKey":
            pem = plugin.key().public_key_pem.encode()
            return {"publicKey": {"publicKeyPEM": _b64(pem)}}
        if method == "signMessage":
            signature = plugin.sign(stdin, _obj(args.get("signOptions"), "signOptions"))
            return {"signMessage": {"signature": _b64(signature)}}
        signature = _b64decode(args.get("signature") or "", "verifySignature.signature")
        plugin.verify(signature, stdin, _obj(args.get("verifyOptions"), "verifyOptions"))
        return {"verifySignature": {}}
    finally:
        plugin.client.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64decode(value: Any, what: str) -> bytes:
    """Go's JSON []byte: standard base64 with padding."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise PluginError(f"{what} is not base64") from None


def main(argv: list[str] | None = None) -> int:
    """Console script ``sigstore-kms-signerd``: one plugin call (see the module
    docstring). Writes one JSON object to stdout; returns 1 after an error."""
    try:
        response = handle(sys.argv[1:] if argv is None else argv, sys.stdin.buffer)
    except (PluginError, SignerdError) as e:
        response = {"errorMessage": str(e)}
    except Exception as e:  # errorMessage is the protocol's only error channel: no traceback
        response = {"errorMessage": f"sigstore-kms-signerd bug: {type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(response))
    sys.stdout.flush()
    return 1 if "errorMessage" in response else 0


if __name__ == "__main__":
    sys.exit(main())
