"""signerd.v1.SignerService: unpack, call the KeyService, answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import grpc

from signerd import certs, metrics, signing
from signerd.errors import InvalidArgument, NotFound, PermissionDenied, SignerdError, quoted
from signerd.keys import (
    METADATA,
    RAW,
    parse_algorithm,
    spki_to_pem,
    validate_gun,
    validate_role,
)
from signerd.server._gate import Caller, Gate, Scope
from signerd.server._readahead import ReadAhead
from signerd.server._status import code_for
from signerd.service import CHECKPOINT_ROLE, KeyService
from signerd.token import KeyEntry, TokenStatus
from signerd.v1 import signer_pb2 as pb
from signerd.v1 import signer_pb2_grpc as pb_grpc

T = TypeVar("T")
Identify = Callable[[grpc.ServicerContext], Caller | SignerdError]
MAX_BATCH = 1000
# SignStream answers at most this many requests, of at most this many bytes (unless one
# request is larger), with one response and one audit write; its reader queues as much.
ROUND_ITEMS = 128
ROUND_BYTES = 1 << 20
SERVICE = "signerd.v1.SignerService"
_STREAM_LATENCY = metrics.LATENCY.labels("SignStream")

_ENCODINGS = {
    pb.SIGNATURE_ENCODING_UNSPECIFIED: signing.Encoding.RAW,
    pb.SIGNATURE_ENCODING_RAW: signing.Encoding.RAW,
    pb.SIGNATURE_ENCODING_DER: signing.Encoding.DER,
}
_PADDINGS = {
    pb.RSA_PADDING_UNSPECIFIED: signing.RsaPadding.PSS,
    pb.RSA_PADDING_PSS: signing.RsaPadding.PSS,
    pb.RSA_PADDING_PKCS1V15: signing.RsaPadding.PKCS1V15,
}
_PROFILES = {
    pb.CERTIFICATE_PROFILE_UNSPECIFIED: None,
    pb.CERTIFICATE_PROFILE_CA: certs.Profile.CA,
    pb.CERTIFICATE_PROFILE_CODE_SIGNING: certs.Profile.CODE_SIGNING,
}
_PURPOSES: dict[int, str] = {
    pb.KEY_PURPOSE_UNSPECIFIED: METADATA,
    pb.KEY_PURPOSE_METADATA: METADATA,
    pb.KEY_PURPOSE_RAW: RAW,
}
_PURPOSE_PB = {METADATA: pb.KEY_PURPOSE_METADATA, RAW: pb.KEY_PURPOSE_RAW}
_ENCODING_PB = {
    signing.Encoding.RAW: pb.SIGNATURE_ENCODING_RAW,
    signing.Encoding.DER: pb.SIGNATURE_ENCODING_DER,
}


def key_message(k: KeyEntry) -> pb.Key:
    return pb.Key(
        key_id=k.key_id,
        algorithm=k.algorithm.name,
        gun=k.gun,
        role=k.role,
        token=k.token,
        keytype=k.algorithm.keytype,
        public_key_der=k.spki_der,
        public_key_pem=spki_to_pem(k.spki_der),
        tuf_public=k.tuf_public,
        used=k.used,
        purpose=_PURPOSE_PB[k.purpose],
    )


def purpose_of(value: int, unspecified: str | None = METADATA) -> str:
    """The purpose a KeyPurpose value names; InvalidArgument for an unknown
    one, or for UNSPECIFIED when ``unspecified`` is None (it must be said)."""
    purpose = _PURPOSES.get(value)
    if purpose is None or (value == pb.KEY_PURPOSE_UNSPECIFIED and unspecified is None):
        raise InvalidArgument(f"purpose must be METADATA (1) or RAW (2), got {value}")
    return purpose


def token_message(t: TokenStatus) -> pb.TokenInfo:
    return pb.TokenInfo(
        name=t.name, module=t.module, profile=t.profile, manufacturer=t.manufacturer,
        model=t.model, serial=t.serial, label=t.label, healthy=t.healthy, error=t.error,
        algorithms=list(t.algorithms), key_count=t.key_count, sessions=t.sessions,
        free_public_memory=-1 if t.free_public_memory is None else t.free_public_memory,
        free_private_memory=-1 if t.free_private_memory is None else t.free_private_memory,
    )


def sign_options(req: pb.SignRequest) -> tuple[bytes, signing.SignOptions]:
    """The payload and options of a SignRequest, validated."""
    if req.encoding not in _ENCODINGS:
        raise InvalidArgument(f"unknown encoding {req.encoding}; use RAW (1) or DER (2)")
    if req.rsa_padding not in _PADDINGS:
        raise InvalidArgument(f"unknown rsa_padding {req.rsa_padding}; use PSS (1) or PKCS1V15 (2)")
    which = req.WhichOneof("payload")
    if which is None:
        raise InvalidArgument(
            "set either 'message' (bytes to sign) or 'digest' (a precomputed hash)"
        )
    payload = req.message if which == "message" else req.digest
    return payload, signing.SignOptions(
        _ENCODINGS[req.encoding], _PADDINGS[req.rsa_padding], prehashed=which == "digest"
    )


def _request_size(request: pb.SignRequest | SignerdError) -> int:
    """Bytes a SignStream request holds (its encoded size; 0 for one that did not decode)."""
    return 0 if isinstance(request, SignerdError) else request.ByteSize()


class SignerServicer(pb_grpc.SignerServiceServicer):
    def __init__(self, service: KeyService, gate: Gate, identify: Identify) -> None:
        self.service = service
        self.gate = gate
        self.identify = identify

    def _run(
        self, context: grpc.ServicerContext, op: str, payload: bytes, work: Callable[[Scope], T]
    ) -> T:
        return self.gate.run(context, self.identify(context), op, payload, work)

    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        def work(scope: Scope) -> pb.Key:
            gun, role = validate_gun(request.gun), validate_role(request.role)
            parse_algorithm(request.algorithm)
            purpose = purpose_of(request.purpose)
            token = request.token or self.service.token_for_role(role).name
            scope.authorize(gun, role, token, token_chosen=not request.token)
            self._known_token(scope, token)
            entry = self.service.create_key(gun, role, request.algorithm, token, purpose)
            scope.key_id = entry.key_id
            scope.extra["purpose"] = purpose
            return key_message(entry)

        return self._run(context, "create", b"", work)

    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        def work(scope: Scope) -> pb.Key:
            return key_message(self._authorized_key(scope, request.key_id))

        return self._run(context, "read", b"", work)

    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        def work(scope: Scope) -> pb.ListKeysResponse:
            scope.gun, scope.role, scope.token = request.gun, request.role, request.token
            self._known_token(scope, request.token)
            # Only the keys the caller may read are listed, and paged: a page
            # token is a key ID, so one of a hidden key would give it away.
            keys, next_token = self.service.list_keys(
                request.gun, request.role, request.token, request.page_size,
                request.page_token, lambda k: scope.allowed(k.gun, k.role, k.token))
            return pb.ListKeysResponse(
                keys=[key_message(k) for k in keys], next_page_token=next_token
            )

        return self._run(context, "read", b"", work)

    def ListTokens(
        self, request: pb.ListTokensRequest, context: grpc.ServicerContext
    ) -> pb.ListTokensResponse:
        def work(scope: Scope) -> pb.ListTokensResponse:
            visible = [t for t in self.service.tokens.values() if scope.allowed_token(t.name)]
            if not visible:
                scope.decision = "deny"
                raise PermissionDenied(
                    f"identity {quoted(str(scope.caller.identity))} may read keys on no token"
                )
            # key_count counts only the keys the caller may read, as ListKeys lists them
            # (so never the audit log's checkpoint key, which no caller may use).
            return pb.ListTokensResponse(tokens=[token_message(replace(t.status(), key_count=sum(
                1 for k in t.known_keys() if k.role != CHECKPOINT_ROLE
                and scope.allowed(k.gun, k.role, k.token))))
                for t in visible])

        return self._run(context, "read", b"", work)

    def DeleteKey(
        self, request: pb.DeleteKeyRequest, context: grpc.ServicerContext
    ) -> pb.DeleteKeyResponse:
        def work(scope: Scope) -> pb.DeleteKeyResponse:
            entry = self._authorized_key(scope, request.key_id)
            self.service.delete_key(entry.key_id)
            return pb.DeleteKeyResponse()

        return self._run(context, "delete", b"", work)

    def _known_token(self, scope: Scope, name: str) -> None:
        """Raise NotFound unless ``name`` is "" or a configured token the
        caller may use for this operation: a token it may not use gets the
        answer, word for word, of one that does not exist, and the message
        lists only the tokens it may use, so that no stranger learns or
        probes their names."""
        if not name or (name in self.service.tokens and scope.allowed_token(name)):
            return
        if name in self.service.tokens:  # the policy refused it: audited as a denial
            scope.decision = "deny"
        yours = [t for t in self.service.tokens if scope.allowed_token(t)]
        raise NotFound(f"no token named {quoted(name)}; "
                       + (f"yours: {', '.join(yours)}" if yours else "you may use none"))

    def _authorized_key(self, scope: Scope, key_id: str) -> KeyEntry:
        """The key ``key_id``, if the caller may do this request's operation
        on it. The audit line names the ID as requested, whether or not such
        a key exists (a probe for an ID leaves its trace)."""
        scope.key_id = key_id
        entry = self.service.get_key(key_id, scope.may_search)
        scope.authorize_key(entry)
        return entry

    def _sign_one(
        self, scope: Scope, req: pb.SignRequest, entry: KeyEntry | None = None,
        audit: dict[str, object] | None = None,
    ) -> pb.SignResponse:
        """Sign one request; what the audit line records of the signature's
        checks goes into ``audit`` (default: the request's own line)."""
        payload, options = sign_options(req)
        entry = entry or self._authorized_key(scope, req.key_id)
        sig = self.service.sign_with(entry, payload, options)
        (scope.extra if audit is None else audit).update(sig.audit)
        return pb.SignResponse(
            key_id=entry.key_id,
            signature=sig.signature,
            algorithm=entry.algorithm.name,
            method=sig.method,
            encoding=_ENCODING_PB[options.encoding],
        )

    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
        payload = request.message or request.digest
        return self._run(context, "sign", payload, lambda scope: self._sign_one(scope, request))

    def SignBatch(
        self, request: pb.SignBatchRequest, context: grpc.ServicerContext
    ) -> pb.SignBatchResponse:
        def work(scope: Scope) -> pb.SignBatchResponse:
            if not request.requests:
                raise InvalidArgument("a batch needs at least one request")
            if len(request.requests) > MAX_BATCH:
                raise InvalidArgument(
                    f"a batch holds at most {MAX_BATCH} requests, got {len(request.requests)}"
                )
            items = []
            # Each distinct key is looked up and authorized once per batch.
            keys: dict[str, KeyEntry | SignerdError] = {}
            checked: list[dict[str, object]] = []  # each item's checks, for the audit line
            for i, req in enumerate(request.requests):
                audit: dict[str, object] = {"item": i}
                try:
                    if req.key_id not in keys:
                        try:
                            keys[req.key_id] = self._authorized_key(scope, req.key_id)
                        except SignerdError as e:
                            keys[req.key_id] = e
                    key = keys[req.key_id]
                    if isinstance(key, SignerdError):
                        raise key
                    items.append(pb.SignBatchItem(
                        code=0, response=self._sign_one(scope, req, key, audit)))
                except SignerdError as e:  # one bad item fails only itself
                    items.append(pb.SignBatchItem(code=code_for(e).value[0], error=str(e)))
                    check = getattr(e, "check", None)
                    if isinstance(check, str):
                        audit["refused"] = {"check": check, "reason": str(e)}
                if len(audit) > 1:
                    checked.append(audit)
            if checked:
                scope.extra["items"] = checked
            scope.key_id = ",".join(sorted({r.key_id for r in request.requests}))[:4096]
            scope.decision = "allow" if any(i.code == 0 for i in items) else "deny"
            return pb.SignBatchResponse(items=items)

        digest_input = b"".join(r.message or r.digest for r in request.requests)
        return self._run(context, "sign", digest_input, work)

    def sign_items(self, context: grpc.ServicerContext, caller: Caller,
                   requests: Sequence[pb.SignRequest | SignerdError],
                   active: Callable[[], bool] = lambda: True) -> pb.SignStreamResponse:
        """Answer requests of a SignStream call: each one authorized, signed
        and audited on its own (one audit line each, written together); one
        response holding one item per request, in the same order. A request that could not be
        decoded arrives as its InvalidArgument and is audited as refused.
        Aborts the call (UNAVAILABLE) if the audit lines cannot be written.
        Once ``active()`` is false (the call is over) the requests left are
        not signed: the response then holds fewer items."""
        def work_for(req: pb.SignRequest | SignerdError) -> Callable[[Scope], pb.SignResponse]:
            def work(scope: Scope) -> pb.SignResponse:
                if isinstance(req, SignerdError):
                    raise req
                return self._sign_one(scope, req)
            return work

        decided = self.gate.run_items(context, caller, "sign", [
            (b"" if isinstance(r, SignerdError) else (r.message or r.digest), work_for(r))
            for r in requests], active)
        for _, line in decided:  # each item counts as a request of its own
            metrics.child(metrics.REQUESTS, SERVICE, "SignStream", str(line["status"])).inc()
            _STREAM_LATENCY.observe(float(line["latency_ms"]) / 1000)  # type: ignore[arg-type]
        return pb.SignStreamResponse(items=[
            pb.SignBatchItem(code=code_for(o).value[0], error=str(o))
            if isinstance(o, SignerdError) else pb.SignBatchItem(code=0, response=o)
            for o, _ in decided])

    def SignStream(self, request_iterator: Iterator[pb.SignRequest | SignerdError],
                   context: grpc.ServicerContext) -> Iterator[pb.SignStreamResponse]:
        """Sign requests as they arrive on the stream (the threads engine; the
        aio engine's driver is signerd.server._aio.sign_stream).

        A reader thread takes requests off the stream while this handler
        signs, so the requests that arrived during one round are answered
        together in the next: one response, one audit write and one send for
        all of them (at most ROUND_ITEMS requests and ROUND_BYTES). A client with one request
        outstanding gets one item per response, as soon as it is signed; a
        client with many gets fewer, larger responses. Measured against one
        response per request in bench/results/ab-stream-readahead.json."""
        caller = self.identify(context)
        if isinstance(caller, SignerdError):
            self.gate.refuse_unidentified(context, "sign", caller)
            return
        with self.gate.stream_slot(context, caller, "sign"), \
                ReadAhead(request_iterator, ROUND_ITEMS, ROUND_BYTES, _request_size) as rounds:
            for requests in rounds:
                response = self.sign_items(context, caller, requests, context.is_active)
                if not context.is_active():  # the client has gone: sign nothing more
                    return
                yield response

    def CertifyKey(
        self, request: pb.CertifyKeyRequest, context: grpc.ServicerContext
    ) -> pb.CertificateChain:
        def work(scope: Scope) -> pb.CertificateChain:
            if request.profile not in _PROFILES:
                raise InvalidArgument(
                    f"unknown profile {request.profile}; use CA (1) or CODE_SIGNING (2)")
            # Certifying gives the key an identity, as creating it did: "create"
            # on the certified key; the issuer key signs: "sign" on it. The
            # subject is settled before the issuer is looked up, so that the
            # answer about a subject the caller may not read never depends on
            # whether it exists.
            scope.key_id = request.key_id  # as requested, until the key is found
            subject = self.service.get_key(request.key_id, scope.may_search)
            scope.authorize_key(subject, "create", action="certify")
            if request.issuer_key_id and request.issuer_key_id != subject.key_id:
                scope.key_id = f"{request.issuer_key_id},{subject.key_id}"
            issuer = (self.service.get_key(request.issuer_key_id, scope.may_search)
                      if request.issuer_key_id else subject)
            try:
                scope.authorize_key(issuer)
            finally:  # the audit line names both keys, allowed or not
                scope.key_id = (issuer.key_id if issuer.key_id == subject.key_id
                                else f"{issuer.key_id},{subject.key_id}")
            done = self.service.certify(subject, issuer, request.subject,
                                        request.validity_days, _PROFILES[request.profile])
            scope.payload_sha256 = done.tbs_sha256
            return pb.CertificateChain(key_id=subject.key_id, certificates=done.chain)

        return self._run(context, "sign", b"", work)

    def GetCertificateChain(
        self, request: pb.GetCertificateChainRequest, context: grpc.ServicerContext
    ) -> pb.CertificateChain:
        def work(scope: Scope) -> pb.CertificateChain:
            entry = self._authorized_key(scope, request.key_id)
            return pb.CertificateChain(key_id=entry.key_id,
                                       certificates=self.service.certificate_chain(entry))

        return self._run(context, "read", b"", work)

    def SetKeyPurpose(self, request: pb.SetKeyPurposeRequest,
                      context: grpc.ServicerContext) -> pb.Key:
        def work(scope: Scope) -> pb.Key:
            scope.key_id = request.key_id  # recorded even when refused (issue 21 §7)
            purpose = purpose_of(request.purpose, unspecified=None)
            entry = self.service.get_key(request.key_id, scope.may_search)
            scope.authorize_key(entry, action="set the purpose of")
            scope.extra["purpose"] = purpose
            scope.extra["previous_purpose"] = entry.purpose
            return key_message(self.service.set_purpose(entry, purpose))

        return self._run(context, "purpose", b"", work)

    def GetState(self, request: pb.GetStateRequest,
                 context: grpc.ServicerContext) -> pb.GetStateResponse:
        def work(scope: Scope) -> pb.GetStateResponse:
            gun = validate_gun(request.gun)
            scope.gun = gun
            # Only the roles whose keys the caller may read, on some token.
            roles = [r for r in self.service.guard.content.versions(gun)
                     if any(scope.allowed(gun, r.role, t) for t in self.service.tokens)]
            return pb.GetStateResponse(gun=gun, roles=[pb.RoleState(
                role=r.role, version=r.version, sha256=r.digest, signed_at=r.signed_at,
                meta=[pb.MetaVersion(name=n, version=v) for n, v in r.meta_versions])
                for r in roles])

        return self._run(context, "read", b"", work)

    def ResetState(self, request: pb.ResetStateRequest,
                   context: grpc.ServicerContext) -> pb.ResetStateResponse:
        def work(scope: Scope) -> pb.ResetStateResponse:
            gun = validate_gun(request.gun)
            scope.authorize(gun, "", "")
            removed = self.service.guard.content.reset(gun)
            scope.extra["removed"] = removed
            return pb.ResetStateResponse(removed=removed)

        return self._run(context, "reset", b"", work)
