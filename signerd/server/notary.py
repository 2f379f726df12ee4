"""Notary-compatible KeyManagement and Signer services (proto package ``proto``).

These let an unmodified notary-server use signerd as its notary-signer
(``trust_service.type = "remote"``). The wire contract follows notary's
``proto/signer.proto``, ``signer/api/rpc_api.go`` (server side) and
``signer/client/signer_trust.go`` (what notary-server reads back):

* ``CreateKey{algorithm, gun, role}`` returns a key that has never signed
  for the same (gun, role, algorithm) if there is one, else a new key (the
  rule of notary's ``signer/keydbstore``); a key's first signature, through
  this API or signerd.v1 (Sign, SignBatch, SignStream, CertifyKey's issuer),
  marks it used. ``algorithm`` is notary's key type: ``"ecdsa"``
  (ECDSA P-256), ``"rsa"`` (RSA-2048) or ``"ed25519"``. Keys made here are
  metadata keys, and only metadata keys are reused: what they sign is
  checked first (signerd.service._guard), so Sign answers INVALID_ARGUMENT
  or FAILED_PRECONDITION, naming the check, for a payload that is not
  acceptable metadata of the key's role or would roll back what was signed.
* ``publicKey`` is what notary calls ``Public()``: DER SubjectPublicKeyInfo
  for ecdsa and rsa, the raw 32 bytes for ed25519. notary-server recomputes
  the key ID from it, which is exactly signerd's key ID.
* ``Sign{keyID, content}`` signs the whole canonical JSON (not a digest):
  ECDSA over SHA-256 as raw r||s (64 bytes; notary rejects DER), RSA-PSS
  with SHA-256 and a 32-byte salt, pure Ed25519. ``Signature.algorithm``
  carries notary's signature method: ``"ecdsa"``, ``"rsapss"``, ``"eddsa"``.
* Unknown key IDs get NOT_FOUND, as in notary-signer; so do malformed ones,
  since to notary a key ID is only a lookup string.

Deliberate differences from notary-signer, all in the direction of saying
more: an unsupported algorithm is INVALID_ARGUMENT (notary answers UNKNOWN),
``DeleteKey`` of an unknown key is NOT_FOUND (notary succeeds; signerd has no
key to authorize the request against, and notary-server never deletes), and
a key that notary cannot verify (ECDSA P-384, which signerd signs over
SHA-384) is FAILED_PRECONDITION.

Every call passes the same gate as signerd.v1: mTLS identity, policy
("create", "read", "sign", "delete" on the key's gun, role and token),
per-identity limits and one audit line.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any, cast

import grpc

from signerd import signing
from signerd.errors import FailedPrecondition, InvalidArgument, NotFound, SignerdError, quoted
from signerd.keys import (
    METADATA,
    Algorithm,
    parse_algorithm,
    validate_gun,
    validate_key_id,
    validate_role,
)
from signerd.notary import signer_pb2 as pb
from signerd.notary import signer_pb2_grpc as pb_grpc
from signerd.server._gate import Caller, Gate, Scope
from signerd.service import KeyService
from signerd.token import KeyEntry

Identify = Callable[[grpc.ServicerContext], Caller | SignerdError]

#: notary-server's ``trust_service.key_algorithm`` -> signerd algorithm.
#: RSA-2048 is the smallest modulus notary's verifier accepts
#: (tuf/signed/verifiers.go, minRSAKeySizeBit) and the fastest to generate.
NOTARY_ALGORITHMS: dict[str, str] = {
    "ecdsa": "ecdsa-p256",
    "rsa": "rsa-2048",
    "ed25519": "ed25519",
}

#: The service names notary-server's health checks ask for (notary's const.go:
#: HealthCheckKeyManagement, HealthCheckSigner). Exactly these strings.
HEALTH_KEY_MANAGEMENT = "grpc.health.v1.Health.KeyManagement"
HEALTH_SIGNER = "grpc.health.v1.Health.Signer"

KEY_MANAGEMENT_SERVICE: str = pb.DESCRIPTOR.services_by_name["KeyManagement"].full_name
SIGNER_SERVICE: str = pb.DESCRIPTOR.services_by_name["Signer"].full_name

# notary signs the whole message: its verifiers hash with SHA-256 themselves.
_SIGN_OPTIONS = signing.SignOptions(signing.Encoding.RAW, signing.RsaPadding.PSS, prehashed=False)

# CreateKey is "find an unused key, else generate one": two concurrent calls
# for the same (gun, role, algorithm) must not both generate. Striped locks
# bound the memory a stream of distinct GUNs can pin.
_CREATE_LOCKS = tuple(threading.Lock() for _ in range(64))


def notary_algorithm(name: str) -> Algorithm:
    """The signerd algorithm for a notary key type; InvalidArgument otherwise."""
    try:
        return parse_algorithm(NOTARY_ALGORITHMS[name])
    except KeyError:
        raise InvalidArgument(
            f"unsupported algorithm {quoted(name)} for a notary key: use one of "
            f"{', '.join(repr(a) for a in NOTARY_ALGORITHMS)} "
            "(notary-server's trust_service.key_algorithm)"
        ) from None


def _check_usable(entry: KeyEntry) -> None:
    """Refuse keys whose signatures notary could not verify.

    notary hashes ECDSA and RSA-PSS messages with SHA-256 only, so an
    ECDSA P-384 key (signed over SHA-384 by signerd) would produce signatures
    notary rejects; better to say so than to hand notary-server such a key.
    """
    if entry.algorithm.hash_name not in ("sha256", None):
        raise FailedPrecondition(
            f"key {entry.key_id} is {entry.algorithm.name}, which notary cannot verify "
            "(it hashes with SHA-256); notary keys are ecdsa-p256, rsa-* or ed25519"
        )


def _key_info(entry: KeyEntry) -> pb.KeyInfo:
    # Algorithm.keytype is notary's key type name ("ecdsa", "rsa", "ed25519").
    return pb.KeyInfo(keyID=pb.KeyID(ID=entry.key_id),
                      algorithm=pb.Algorithm(algorithm=entry.algorithm.keytype))


def _create_lock(gun: str, role: str, alg: Algorithm) -> threading.Lock:
    digest = hashlib.sha256(f"{gun}\0{role}\0{alg.name}".encode()).digest()
    return _CREATE_LOCKS[digest[0] % len(_CREATE_LOCKS)]


class _Base:
    """Shared plumbing. The servicers implement every method of their
    service, so they need none of the generated base classes' UNIMPLEMENTED
    defaults (and mypy sees no untyped base class)."""

    def __init__(self, service: KeyService, gate: Gate, identify: Identify) -> None:
        self.service = service
        self.gate = gate
        self.identify = identify

    def _run(self, context: grpc.ServicerContext, op: str, payload: bytes,
             work: Callable[[Scope], Any]) -> Any:
        return self.gate.run(context, self.identify(context), op, payload, work)

    def _key(self, scope: Scope, key_id: pb.KeyID) -> KeyEntry:
        """The key called ``key_id``. A malformed ID is NOT_FOUND, as in notary.
        The audit line names the ID as requested, found or not."""
        scope.key_id = key_id.ID
        try:
            validate_key_id(key_id.ID)
        except InvalidArgument:
            raise NotFound(f"key {quoted(key_id.ID)} not found: notary key IDs are "
                           "64 lowercase hex characters") from None
        return self.service.get_key(key_id.ID, scope.may_search)


class KeyManagementServicer(_Base):
    """proto.KeyManagement: CreateKey, GetKeyInfo, DeleteKey."""

    def CreateKey(self, request: pb.CreateKeyRequest,
                  context: grpc.ServicerContext) -> pb.PublicKey:
        def work(scope: Scope) -> pb.PublicKey:
            alg = notary_algorithm(request.algorithm)
            gun, role = validate_gun(request.gun), validate_role(request.role)
            token = self.service.token_for_role(role).name
            # Authorize before looking for an unused key, so that a caller
            # the policy refuses learns nothing about existing keys.
            scope.authorize(gun, role, token, token_chosen=True)
            with _create_lock(gun, role, alg):
                entry = self.service.find_unused(gun, role, alg, METADATA)
                if entry is not None:
                    scope.authorize(gun, role, key=entry)  # it may sit on another token
                else:
                    entry = self.service.create_key(gun, role, alg.name, token, METADATA)
                    scope.key_id = entry.key_id
            return pb.PublicKey(keyInfo=_key_info(entry), publicKey=entry.tuf_public)

        result: pb.PublicKey = self._run(context, "create", b"", work)
        return result

    def GetKeyInfo(self, request: pb.KeyID,
                   context: grpc.ServicerContext) -> pb.GetKeyInfoResponse:
        def work(scope: Scope) -> pb.GetKeyInfoResponse:
            entry = self._key(scope, request)
            scope.authorize_key(entry)
            _check_usable(entry)
            return pb.GetKeyInfoResponse(keyInfo=_key_info(entry), publicKey=entry.tuf_public,
                                         role=entry.role)

        result: pb.GetKeyInfoResponse = self._run(context, "read", b"", work)
        return result

    def DeleteKey(self, request: pb.KeyID, context: grpc.ServicerContext) -> pb.Void:
        def work(scope: Scope) -> pb.Void:
            entry = self._key(scope, request)
            scope.authorize_key(entry)
            self.service.delete_key(entry.key_id)
            return pb.Void()

        result: pb.Void = self._run(context, "delete", b"", work)
        return result


class SignerServicer(_Base):
    """proto.Signer: Sign."""

    def Sign(self, request: pb.SignatureRequest, context: grpc.ServicerContext) -> pb.Signature:
        def work(scope: Scope) -> pb.Signature:
            entry = self._key(scope, request.keyID)
            scope.authorize_key(entry)
            _check_usable(entry)
            sig = self.service.sign_with(entry, request.content, _SIGN_OPTIONS)  # marks it used
            scope.extra.update(sig.audit)
            return pb.Signature(keyInfo=_key_info(entry),
                                algorithm=pb.Algorithm(algorithm=sig.method),
                                content=sig.signature)

        result: pb.Signature = self._run(context, "sign", request.content, work)
        return result


def _register(add: object) -> Callable[[object, grpc.Server], None]:
    """Type a generated (untyped) ``add_*Servicer_to_server`` function."""
    return cast(Callable[[object, grpc.Server], None], add)


def add_to_server(server: grpc.Server, service: KeyService, gate: Gate,
                  identify: Identify) -> list[str]:
    """Add the Notary services to ``server``; return the names to report in
    health and reflection: the two service names and the two health check
    names notary-server asks for."""
    _register(pb_grpc.add_KeyManagementServicer_to_server)(
        KeyManagementServicer(service, gate, identify), server)
    _register(pb_grpc.add_SignerServicer_to_server)(
        SignerServicer(service, gate, identify), server)
    return [KEY_MANAGEMENT_SERVICE, SIGNER_SERVICE, HEALTH_KEY_MANAGEMENT, HEALTH_SIGNER]
