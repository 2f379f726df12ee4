"""A securesystemslib ``Signer`` that signs TUF metadata through signerd.

Importing this module registers the ``signerd`` private key URI scheme in
securesystemslib's ``SIGNER_FOR_URI_SCHEME``, so python-tuf's
``Signer.from_priv_key_uri()`` finds :class:`SignerdSigner`. Needs the ``tuf``
extra (``pip install 'signerd[tuf]'``: securesystemslib and python-tuf).

Private key URIs::

    signerd:KEYID                            signerctl's client config: $SIGNERCTL_CONFIG,
                                             else the embedded daemon's client.toml
    signerd:KEYID?config=/etc/ci/client.toml that client config (percent-encoded;
                                             a relative path is relative to the
                                             signing process's working directory)

``KEYID`` is signerd's key ID: the TUF/Notary key ID, hex SHA-256 of the
canonical JSON ``{"keytype":T,"keyval":{"private":null,"public":B64}}``. The
public key that :meth:`SignerdSigner.import_` returns is a plain
``SSlibKey`` whose ``keyid`` is securesystemslib's default key ID
(``compute_default_keyid``: SHA-256 of canonical ``{"keytype","scheme","keyval"}``).
The two differ: TUF metadata lists and signatures carry the SSlibKey's key
ID, and signerd's appears only in the URI. Verifiers need nothing from signerd.

Keys and signatures (``sig`` is hex, as securesystemslib writes it)::

    signerd algorithm   keytype  scheme               keyval.public  sig
    ecdsa-p256          ecdsa    ecdsa-sha2-nistp256  PEM SPKI       DER ECDSA over SHA-256
    ecdsa-p384          ecdsa    ecdsa-sha2-nistp384  PEM SPKI       DER ECDSA over SHA-384
    rsa-2048/3072/4096  rsa      rsassa-pss-sha256    PEM SPKI       RSASSA-PSS, SHA-256,
                                                                     MGF1-SHA-256, salt 32
    ed25519             ed25519  ed25519              hex, 32 bytes  64 bytes, pure Ed25519

securesystemslib verifies RSASSA-PSS with ``salt_length=PSS.AUTO``
(``SSlibKey._get_rsa_padding``), which accepts signerd's salt of 32. An RSA
key given the scheme ``rsa-pkcs1v15-sha256`` signs RSASSA-PKCS1-v1_5 instead.
The whole payload is sent, for every algorithm: signerd's keys for TUF
metadata are metadata keys (``signerctl keys create --purpose metadata``,
the default), and signerd checks what such a key signs (its role, OLPC
canonical form, expiry bounds, no rollback below a version already signed,
no freeze of snapshot/timestamp meta) before signing, which a digest would
not let it do. Metadata must therefore fit the daemon's
``server.max_message_bytes`` (default 1 MiB: about 3,800 targets with
SHA-256 and SHA-512 hashes; raise it for larger targets metadata: the
README's python-tuf section gives figures). A refusal is a
SignerdSignerError whose status is INVALID_ARGUMENT or FAILED_PRECONDITION
and whose message names the check.

Secrets never go in the URI: it has no parameter but ``config``, and any
other is refused. The client certificate's key is read from the file the
client config names, as signerctl reads it; ``secrets_handler`` is accepted
for the ``Signer`` interface and never called.

Errors: ``ValueError`` for a malformed URI or key ID, or a public key this
signer cannot sign for; ``KeyMismatchError`` (a ``ValueError``) when the
public key is not signerd's key ``KEYID``; ``UnsupportedAlgorithmError`` for
a signerd key with no securesystemslib scheme; :class:`SignerdSignerError`
when signerd refuses or cannot be reached (its message names the gRPC status)
or the client config is unusable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib import parse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.signer import (  # type: ignore[attr-defined]  # no __all__ there
    ECDSA_SHA2_NISTP256,
    ECDSA_SHA2_NISTP384,
    ED25519,
    KEY_TYPE_ECDSA,
    KEY_TYPE_ED25519,
    KEY_TYPE_RSA,
    RSA_PKCS1V15_SHA256,
    RSASSA_PSS_SHA256,
    SIGNER_FOR_URI_SCHEME,
    Key,
    SecretsHandler,
    Signature,
    Signer,
    SSlibKey,
)

from signerd import keys
from signerd.adapters import _remote
from signerd.client import Client, ClientConfig
from signerd.errors import SignerdError

SCHEME = "signerd"


class SignerdSignerError(sslib_exceptions.Error):
    """signerd refused or could not be reached, or the client config is unusable.

    ``status`` is the gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``...),
    or None when the problem is local (a missing client config or TLS file).
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Scheme:
    """How one securesystemslib scheme is signed through signerd."""

    hash_name: str | None  # the hash signerd signs the payload with (None: pure Ed25519)
    rsa_padding: str = "pss"
    curve: str | None = None  # the EC curve the scheme verifies with


_SCHEMES: dict[tuple[str, str], _Scheme] = {
    (KEY_TYPE_ECDSA, ECDSA_SHA2_NISTP256): _Scheme("sha256", curve="secp256r1"),
    (KEY_TYPE_ECDSA, ECDSA_SHA2_NISTP384): _Scheme("sha384", curve="secp384r1"),
    (KEY_TYPE_RSA, RSASSA_PSS_SHA256): _Scheme("sha256"),
    (KEY_TYPE_RSA, RSA_PKCS1V15_SHA256): _Scheme("sha256", rsa_padding="pkcs1v15"),
    (KEY_TYPE_ED25519, ED25519): _Scheme(None),
}
# The scheme import_ gives each signerd algorithm (securesystemslib's defaults).
_SCHEME_FOR_ALGORITHM = {
    "ecdsa-p256": ECDSA_SHA2_NISTP256,
    "ecdsa-p384": ECDSA_SHA2_NISTP384,
    "rsa-2048": RSASSA_PSS_SHA256,
    "rsa-3072": RSASSA_PSS_SHA256,
    "rsa-4096": RSASSA_PSS_SHA256,
    "ed25519": ED25519,
}


def _client_config(path: Path | None) -> ClientConfig:
    try:
        return _remote.load_client_config(path)
    except SignerdError as e:
        raise SignerdSignerError(str(e)) from None


@contextmanager
def _calling(cfg: ClientConfig, call: str) -> Iterator[Client]:
    """A signerd client for one call; signerd's errors become SignerdSignerError."""
    try:
        with _remote.calling(cfg, call) as client:
            yield client
    except _remote.RemoteError as e:
        raise SignerdSignerError(str(e), e.status) from None
    except SignerdError as e:
        raise SignerdSignerError(str(e)) from None


def _validate_key_id(key_id: str) -> str:
    try:
        return keys.validate_key_id(key_id)
    except SignerdError as e:
        raise ValueError(f"not a signerd key ID: {e}") from None


def _signerd_key_id(key: SSlibKey, curve: str | None) -> str:
    """signerd's (TUF/Notary) key ID of an SSlibKey's public value, checking
    that an ECDSA key is on ``curve``. Raises ValueError."""
    public = key.keyval["public"]
    if key.keytype == KEY_TYPE_ED25519:
        return keys.key_id(key.keytype, bytes.fromhex(public))
    spki = serialization.load_pem_public_key(public.encode())
    if curve is not None and not (
        isinstance(spki, ec.EllipticCurvePublicKey) and spki.curve.name == curve
    ):
        raise ValueError(f"{key.scheme} needs a {curve} key; key {key.keyid} is not one")
    der = spki.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return keys.key_id(key.keytype, der)


def parse_uri(priv_key_uri: str) -> tuple[str, Path | None]:
    """Split ``signerd:KEYID[?config=PATH]`` into signerd's key ID and the
    client config path (None: signerctl's default). Raises ValueError."""
    uri = parse.urlsplit(priv_key_uri)
    if uri.scheme != SCHEME:
        raise ValueError(f"SignerdSigner takes signerd:KEYID URIs, not scheme {uri.scheme!r}")
    if uri.netloc or uri.fragment or not uri.path:
        raise ValueError("a signerd URI is signerd:KEYID or signerd:KEYID?config=PATH")
    try:
        params = parse.parse_qs(uri.query, keep_blank_values=True, strict_parsing=bool(uri.query))
    except ValueError:
        raise ValueError("a signerd URI's query is config=PATH, percent-encoded") from None
    # Only names are echoed: a value could be a secret someone put there.
    unknown = sorted(set(params) - {"config"})
    if unknown:
        raise ValueError(
            f"unknown signerd URI parameter(s) {', '.join(unknown)}: only config=PATH "
            "is accepted, and secrets never go in the URI"
        )
    configs = params.get("config", [])
    if len(configs) > 1 or configs == [""]:
        raise ValueError("a signerd URI takes one non-empty config=PATH")
    return _validate_key_id(uri.path), Path(configs[0]) if configs else None


def make_uri(key_id: str, config: Path | str | None = None) -> str:
    """The private key URI of signerd key ``key_id``, with ``config`` if given."""
    uri = f"{SCHEME}:{_validate_key_id(key_id)}"
    if config is not None:
        uri += "?config=" + parse.quote(str(config), safe="/")
    return uri


class SignerdSigner(Signer):
    """Signs with a key on a PKCS#11 token through signerd (signerd.v1 Sign).

    Make one with ``Signer.from_priv_key_uri(uri, public_key)``, after
    :meth:`import_` gave the URI and the public key. See the module docstring
    for the URI format, keys, signatures and errors.
    """

    SCHEME = SCHEME

    def __init__(self, key_id: str, public_key: SSlibKey, config: Path | None = None) -> None:
        """Raises ValueError (a scheme this signer cannot sign),
        KeyMismatchError (``public_key`` is not signerd's ``key_id``), or
        SignerdSignerError (no usable client config)."""
        scheme = _SCHEMES.get((public_key.keytype, public_key.scheme))
        if scheme is None:
            raise ValueError(
                f"signerd cannot sign for {public_key.keytype}/{public_key.scheme}; "
                f"use one of: {', '.join(f'{t}/{s}' for t, s in _SCHEMES)}"
            )
        self.key_id = _validate_key_id(key_id)
        if _signerd_key_id(public_key, scheme.curve) != self.key_id:
            raise sslib_exceptions.KeyMismatchError(
                f"public key {public_key.keyid} is not signerd key {key_id}"
            )
        self._public_key = public_key
        self._scheme = scheme
        self._config = _client_config(config)

    @property
    def public_key(self) -> SSlibKey:
        """The securesystemslib public key this signer signs for."""
        return self._public_key

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> SignerdSigner:
        """The signer for ``signerd:KEYID[?config=PATH]`` and its public key.

        No network call: the key is checked against the URI's key ID locally.
        ``secrets_handler`` is never called (see the module docstring).
        Raises ValueError, KeyMismatchError or SignerdSignerError.
        """
        if not isinstance(public_key, SSlibKey):
            raise ValueError(f"SignerdSigner needs an SSlibKey, not {type(public_key).__name__}")
        key_id, config = parse_uri(priv_key_uri)
        return cls(key_id, public_key, config)

    @classmethod
    def import_(cls, key_id: str, config: Path | str | None = None) -> tuple[str, SSlibKey]:
        """Fetch signerd key ``key_id`` (signerd.v1 GetKey) as a private key URI
        and a standard SSlibKey (keytype, scheme and keyval as in the module
        docstring; key ID: securesystemslib's default).

        ``config``: a client config path, written into the URI; None uses
        signerctl's ($SIGNERCTL_CONFIG, else the embedded daemon's).
        Raises ValueError (malformed key ID), UnsupportedAlgorithmError, or
        SignerdSignerError (e.g. NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE).
        """
        key_id = _validate_key_id(key_id)
        cfg = _client_config(Path(config) if config is not None else None)
        with _calling(cfg, f"GetKey {key_id}") as client:
            key = client.get_key(key_id)
        scheme = _SCHEME_FOR_ALGORITHM.get(key.algorithm)
        if scheme is None:
            raise sslib_exceptions.UnsupportedAlgorithmError(
                f"signerd key {key_id} is {key.algorithm}, which has no securesystemslib scheme"
            )
        public = serialization.load_der_public_key(key.public_key_der)
        return make_uri(key_id, config), SSlibKey.from_crypto(public, scheme=scheme)

    def sign(self, payload: bytes) -> Signature:
        """Sign ``payload`` (TUF's canonical signed bytes) with signerd.v1 Sign.

        Returns a Signature with the SSlibKey's key ID and ``sig`` in hex: DER
        ECDSA, PSS (or PKCS#1 v1.5) RSA, or 64-byte Ed25519. Raises
        SignerdSignerError naming the gRPC status when signerd refuses.
        """
        try:
            with _calling(self._config, f"Sign {self.key_id}") as client:
                resp = client.sign(self.key_id, message=payload, encoding="der",
                                   rsa_padding=self._scheme.rsa_padding)
        except SignerdSignerError as e:
            if e.status == "RESOURCE_EXHAUSTED" and "larger than max" in str(e):
                raise SignerdSignerError(
                    f"metadata of {len(payload)} bytes is larger than signerd's "
                    "server.max_message_bytes: raise that limit (metadata keys need the whole "
                    "payload, not a digest)", e.status) from None
            raise
        return Signature(self._public_key.keyid, bytes(resp.signature).hex())


SIGNER_FOR_URI_SCHEME[SCHEME] = SignerdSigner
