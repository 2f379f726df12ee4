"""Where Content Trust keys come from: the signerd daemon, or the tokens themselves.

A :class:`KeySource` creates and looks up keys and hands out
:class:`~signerd.trust.signer.TrustSigner` objects over them.
:class:`DaemonKeys` goes through the signerd daemon (the client's mTLS
identity and signerd's policy decide which keys it may use);
:class:`TokenKeys` opens the tokens of a signerd config in this process
(``signerctl trust --local``, for offline root ceremonies), with no policy.

The daemon's gRPC client is made by the caller and passed in: nothing here
imports gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from signerd import signing
from signerd.errors import FailedPrecondition, InvalidArgument, NotFound
from signerd.keys import Algorithm, parse_algorithm
from signerd.trust._key import TufKey
from signerd.trust.signer import METHODS, TrustSigner

if TYPE_CHECKING:
    from signerd.client import Client
    from signerd.service import KeyService
    from signerd.token import KeyEntry
    from signerd.v1 import signer_pb2 as pb

NEW_KEY_ALGORITHM = "ecdsa-p256"  # what notary generates; every Notary client verifies it


def _notary_usable(key_id: str, alg: Algorithm) -> None:
    # Notary verifies ECDSA and RSA-PSS over SHA-256 only; signerd signs
    # with a P-384 key over SHA-384, which no Notary client would accept.
    if alg.hash_name not in ("sha256", None):
        raise FailedPrecondition(
            f"key {key_id} is {alg.name}, which Notary cannot verify; "
            "use ecdsa-p256, rsa-* or ed25519 keys for Content Trust"
        )


class _Signer:
    """The TrustSigner part common to both key sources.

    Every signature is checked against the public key before it is used:
    a token that returns garbage must not produce metadata that no client
    accepts.
    """

    def __init__(self, key_id: str, alg: Algorithm, public: bytes) -> None:
        _notary_usable(key_id, alg)
        self.key_id = key_id  # canonical TUF key ID (the ID signerd knows the key by)
        self.keytype = alg.keytype
        self.public = public  # TUF public value: DER SPKI, or 32 raw bytes for ed25519
        self.method = METHODS[alg.keytype]

    def sign(self, message: bytes) -> bytes:
        """Notary's format: raw r||s over SHA-256, RSA-PSS salt 32, or pure Ed25519."""
        sig = self._sign(message, signing.RsaPadding.PSS)
        self._check(self.method, sig, message)
        return sig

    def sign_pkcs1v15(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 over SHA-256, for RSA root certificates."""
        if self.keytype != "rsa":
            raise InvalidArgument(f"key {self.key_id} is not RSA: no PKCS#1 v1.5 signatures")
        sig = self._sign(message, signing.RsaPadding.PKCS1V15)
        self._check("rsapkcs1v15", sig, message)
        return sig

    def _check(self, method: str, sig: bytes, message: bytes) -> None:
        if not TufKey(self.keytype, self.public).verify(method, sig, message):
            raise FailedPrecondition(f"signature by key {self.key_id} does not verify")

    def _sign(self, message: bytes, padding: signing.RsaPadding) -> bytes:
        raise NotImplementedError


class RemoteSigner(_Signer):
    """A key held by the signerd daemon: each signature is one Sign call over mTLS.

    Raises FailedPrecondition for a key Notary cannot verify (P-384).
    """

    def __init__(self, client: Client, key: pb.Key) -> None:
        super().__init__(key.key_id, parse_algorithm(key.algorithm), bytes(key.tuf_public))
        self._client = client

    def _sign(self, message: bytes, padding: signing.RsaPadding) -> bytes:
        resp = self._client.sign(
            self.key_id, message=message, encoding="raw", rsa_padding=padding.value
        )
        return bytes(resp.signature)


class TokenSigner(_Signer):
    """A key on a token opened in this process (``--local``): no daemon, no policy."""

    def __init__(self, service: KeyService, entry: KeyEntry) -> None:
        super().__init__(entry.key_id, entry.algorithm, entry.tuf_public)
        self._service = service
        self._entry = entry

    def _sign(self, message: bytes, padding: signing.RsaPadding) -> bytes:
        options = signing.SignOptions(signing.Encoding.RAW, padding)
        return self._service.sign_with(self._entry, message, options).signature


class KeySource(Protocol):
    """Where keys are created and looked up: the daemon, or the tokens themselves."""

    def create(self, gun: str, role: str) -> TrustSigner:
        """A new key for (gun, role), on the token signerd's config gives the role."""
        ...

    def get(self, key_id: str) -> TrustSigner:
        """The key ``key_id``; raises if it is unknown or not the caller's to use."""
        ...

    def find(self, key_id: str) -> TrustSigner | None:
        """Like :meth:`get`, but None when the key is unknown or not the caller's."""
        ...

    def delete(self, key_id: str) -> None:
        """Destroy the key (one this workflow made and failed to use); raises if it cannot."""
        ...


class DaemonKeys:
    """Keys through the signerd daemon; the policy decides what the caller sees.

    Errors from the daemon are ``grpc.RpcError`` with its status.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, gun: str, role: str) -> TrustSigner:
        """Create a key in signerd (root keys land on the root token)."""
        return RemoteSigner(self.client, self.client.create_key(gun, role, NEW_KEY_ALGORITHM))

    def get(self, key_id: str) -> TrustSigner:
        """The key, read through GetKey."""
        return RemoteSigner(self.client, self.client.get_key(key_id))

    def find(self, key_id: str) -> TrustSigner | None:
        """The key, or None when signerd does not have it or will not show it to the caller."""
        key = self.client.find_key(key_id)
        return RemoteSigner(self.client, key) if key is not None else None

    def delete(self, key_id: str) -> None:
        """DeleteKey (the policy must grant "delete")."""
        self.client.delete_key(key_id)


class TokenKeys:
    """Keys straight on the tokens of a signerd config (``--local``)."""

    def __init__(self, service: KeyService) -> None:
        self.service = service

    def create(self, gun: str, role: str) -> TrustSigner:
        """Generate a key on the token the config gives the role."""
        return TokenSigner(self.service, self.service.create_key(gun, role, NEW_KEY_ALGORITHM))

    def get(self, key_id: str) -> TrustSigner:
        """The key on whichever token holds it; NotFound if none does."""
        return TokenSigner(self.service, self.service.get_key(key_id))

    def find(self, key_id: str) -> TrustSigner | None:
        """The key, or None if no token holds it."""
        try:
            return self.get(key_id)
        except NotFound:
            return None

    def delete(self, key_id: str) -> None:
        """Destroy the key on its token."""
        self.service.delete_key(key_id)
