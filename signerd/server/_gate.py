"""Every RPC passes the gate: identity, fair admission, policy, audit.

Servicers call :meth:`Gate.run` with the operation name and a function that
does the work. The function authorizes through its :class:`Scope` once it
knows which key (GUN, role, token) is involved. Whatever happens, one audit
line is written before the answer leaves; if it cannot be written, the
answer is UNAVAILABLE (fail closed), even for work already done.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from signerd import metrics
from signerd.audit import AuditLog
from signerd.errors import (
    InvalidArgument,
    NoSuchKey,
    PermissionDenied,
    ResourceExhausted,
    SignerdError,
    Unavailable,
    quoted,
)
from signerd.policy import Decision, Identity, Policy, PolicyStore, Request
from signerd.server._fair import Admission
from signerd.server._status import code_for, status_name
from signerd.token import KeyEntry

log = logging.getLogger("signerd.server")
T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    """Who is asking (its typed identity), and over which listener."""

    identity: Identity
    transport: str  # "tcp" or "unix"
    peer: str


@dataclass
class Scope:
    """One request in flight."""

    caller: Caller
    operation: str
    request_id: str
    policy: Policy  # taken once per request: a SIGHUP reload never splits a request
    payload_sha256: str = ""
    key_id: str = ""
    gun: str = ""
    role: str = ""
    token: str = ""
    # "allow" or "deny" once the policy was asked about the request's key (or
    # names); a request that ends before that (an unknown key or token, a
    # malformed request) is audited "none" (see Gate.decide).
    decision: str = "allow"
    decided: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def allowed(self, gun: str, role: str, token: str, operation: str | None = None) -> bool:
        """Ask the policy without recording anything (used to filter listings)."""
        req = Request(
            identity=self.caller.identity,
            transport=self.caller.transport,
            operation=operation or self.operation,
            gun=gun,
            role=role,
            token=token,
        )
        return self.policy.decide(req).allowed

    def may_search(self) -> bool:
        """Whether a key ID this process has not listed is worth a token
        search for this caller: some rule grants it something on some key.
        A stranger's misses (NoSuchKey either way) then cost no search, and
        cannot queue other callers' lookups behind theirs."""
        return self.policy.grants_anything(self.caller.identity, self.caller.transport)

    def allowed_token(self, token: str) -> bool:
        """Whether the caller may do this operation on some key of ``token``."""
        return self.policy.grants_on_token(Request(
            identity=self.caller.identity, transport=self.caller.transport,
            operation=self.operation, gun="", role="", token=token))

    def _decide(self, operation: str, gun: str, role: str, token: str) -> Decision:
        return self.policy.decide(Request(
            identity=self.caller.identity, transport=self.caller.transport,
            operation=operation, gun=gun, role=role, token=token))

    def _denied(self, action: str, gun: str, role: str, reason: str) -> PermissionDenied:
        self.decision = "deny"
        what = f"{role} keys of {gun}" if gun else "this"
        who = quoted(str(self.caller.identity))
        return PermissionDenied(f"identity {who} may not {action} {what} "
                                f"over {self.caller.transport}: {reason}")

    def authorize(self, gun: str, role: str, token: str = "", key: KeyEntry | None = None,
                  token_chosen: bool = False) -> None:
        """Raise PermissionDenied unless the policy grants this operation on
        keys of ``gun``, ``role`` and ``token`` (or those of ``key``). For
        names the caller gave itself (a key to create); a request that names
        a key by its ID uses :meth:`authorize_key`.

        ``token_chosen``: signerd chose ``token`` (the role's token), the
        caller did not name it; a refusal then names it only to a caller that
        may use that token, so a stranger learns no token names."""
        if key is not None:
            self.key_id, gun, role, token = key.key_id, key.gun, key.role, key.token
        self.gun, self.role, self.token = gun, role, token
        decision = self._decide(self.operation, gun, role, token)
        self.decided = True
        if not decision.allowed:
            reason = decision.reason
            if token_chosen and not self.allowed_token(token):
                reason = reason.replace(f"token {quoted(token)}", f"the token for {role} keys")
            raise self._denied(self.operation, gun, role, reason)

    def authorize_key(self, key: KeyEntry, operation: str | None = None,
                      action: str | None = None) -> None:
        """Raise unless the policy grants ``operation`` (default: this
        request's) on ``key``, which the caller named by its ID.

        A caller that may not even read the key learns nothing of it: the
        answer is NoSuchKey (NOT_FOUND, "no key with ID ..."), word for word
        what a key that does not exist gets. One that may read it is told
        PermissionDenied, naming the key's GUN and role (which it can read),
        and what it may not do (``action``, default the operation). Either
        way the request is a denial, and its audit line names the key, its
        GUN, role and token."""
        operation = operation or self.operation
        self.key_id, self.gun, self.role, self.token = key.key_id, key.gun, key.role, key.token
        decision = self._decide(operation, key.gun, key.role, key.token)
        self.decided = True
        if decision.allowed:
            return
        self.decision = "deny"
        if operation != "read" and self._decide("read", key.gun, key.role, key.token).allowed:
            raise self._denied(action or operation, key.gun, key.role, decision.reason)
        raise NoSuchKey(key.key_id)


class Gate:
    """Identity, admission, policy and audit around every RPC handler.

    ``admission`` (signerd.server._fair.Admission) shares the process's
    work slots between identities: a request waits for its identity's share
    (until its deadline) instead of being refused, and is refused
    RESOURCE_EXHAUSTED only when the bounded queue is full. The threads
    engine waits here, on the request's handler thread; the aio engine waits
    on its event loop before it dispatches the call (signerd.server._aio),
    and marks the context (``admission``) so that the gate does not wait
    again."""

    def __init__(
        self,
        policy: PolicyStore,
        audit: AuditLog | None,
        admission: Admission,
        on_unavailable: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy
        self.audit = audit
        self.admission = admission
        self._on_unavailable = on_unavailable

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no request runs or waits and
        no stream is open; whether none is. For stopping: tokens and the
        audit log are closed only after the handlers that use them are done."""
        return self.admission.wait_idle(timeout)

    def _audit_or_abort(self, context: grpc.ServicerContext, *lines: dict[str, object]) -> None:
        """Write the audit lines (one write for all of them); if they cannot
        be written, fail the request closed (UNAVAILABLE)."""
        if self.audit is None:
            return
        try:
            self.audit.write_many(lines)
            metrics.AUDIT_WRITES.inc(len(lines))
        except Unavailable as e:
            metrics.AUDIT_FAILURES.inc()
            log.error("audit write failed; failing the request closed",
                      extra={"fields": {"request_id": lines[0]["request_id"], "error": str(e)}})
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    def reject_undecodable(self, context: grpc.ServicerContext, method: str,
                           message: str) -> None:
        """Answer INVALID_ARGUMENT for a request whose bytes are not the
        method's message, after auditing it (the caller is not identified:
        its peer address is recorded). Raises, as context.abort does."""
        self._refuse_call(context, method.rpartition("/")[2], InvalidArgument(message),
                          time.perf_counter())

    def _refuse_call(self, context: grpc.ServicerContext, operation: str,
                     error: SignerdError, start: float, caller: Caller | None = None) -> None:
        """Audit and refuse a whole call: one whose request does not decode
        or whose listener could not identify the peer (``caller`` None), or
        a stream there is no room for. Raises, as context.abort does."""
        status = code_for(error)
        self._audit_or_abort(context, {
            "request_id": secrets.token_hex(8),
            "identity": str(caller.identity) if caller else "",
            "peer": caller.peer if caller else context.peer(),
            "transport": caller.transport if caller else "", "operation": operation,
            "key_id": "", "gun": "", "role": "", "token": "", "payload_sha256": "",
            "decision": "deny", "status": status_name(status),
            "latency_ms": round((time.perf_counter() - start) * 1000, 3)})
        context.abort(status, str(error))

    @contextmanager
    def stream_slot(self, context: grpc.ServicerContext, caller: Caller,
                    operation: str) -> Iterator[None]:
        """Count a streaming call as open for its whole life, open or idle:
        at most ``admission.max_streams`` of all identities (half of
        server.threads, as in the threads engine each holds a handler thread
        that long). Past it, or for an identity no rule grants ``operation`` on
        any key (PERMISSION_DENIED, before a slot is held: a stranger's idle
        streams never shut the others out), the call is audited and refused at
        once (context.abort raises). An identity the policy does grant may hold
        them all: one identity (a notary-server, a CI pool) is often the only
        caller, and fairness between identities is the queue's, not refusal's. An
        open stream holds no work slot: each of its requests waits for one as a
        unary request does (run_items)."""
        start = time.perf_counter()
        who = caller.identity
        error: SignerdError | None = None
        if not self.policy.current.grants_anything(who, caller.transport, operation):
            error = PermissionDenied(
                f"identity {quoted(str(who))} may not {operation} anything over "
                f"{caller.transport}: no rule grants it")
        else:
            try:
                self.admission.open_stream()
            except ResourceExhausted as e:
                error = e
        if error is not None:
            self._refuse_call(context, operation, error, start, caller)
            raise AssertionError("unreachable: context.abort raises")
        try:
            yield
        finally:
            self.admission.close_stream()

    def decide(self, caller: Caller, operation: str, payload: bytes,
               work: Callable[[Scope], T], context: Any = None,
               ) -> tuple[T | SignerdError, dict[str, object]]:
        """Run ``work`` for one request of ``caller`` once admitted (a work
        slot, waited for until ``context``'s deadline or its caller goes
        away; unless the aio engine already admitted it: ``context.admission``
        True, or the SignerdError that refused it), and return its result
        (or the SignerdError it ends in) with the audit line that records
        it, not yet written. A bug in ``work`` (any other exception) is
        logged and becomes an INTERNAL error."""
        start = time.perf_counter()
        request_id = secrets.token_hex(8)
        scope = Scope(
            caller,
            operation,
            request_id,
            self.policy.current,
            hashlib.sha256(payload).hexdigest() if payload else "",
        )
        outcome: T | SignerdError
        admitted = getattr(context, "admission", None)
        entered = False
        try:
            if isinstance(admitted, SignerdError):
                raise admitted
            if admitted is not True:
                self.admission.acquire(caller.identity, _time_left(context),
                                       getattr(context, "add_callback", None))
                entered = True
            outcome = work(scope)
        except SignerdError as e:
            outcome = e
        except Exception:  # a bug, not the client's fault: log it, answer INTERNAL
            log.exception("internal error", extra={"fields": {"request_id": request_id}})
            outcome = SignerdError(f"internal error; request id {request_id}")
        finally:
            if entered:
                self.admission.release(caller.identity)
        if isinstance(outcome, PermissionDenied):
            scope.decision = "deny"
        elif isinstance(outcome, SignerdError) and not scope.decided and \
                scope.decision == "allow":
            scope.decision = "none"  # refused before the policy was asked (issue 21 §7)
        if scope.decision == "deny":
            metrics.DENIALS.labels(operation).inc()
        status = code_for(outcome) if isinstance(outcome, SignerdError) else grpc.StatusCode.OK
        line: dict[str, object] = {
            "request_id": request_id,
            "identity": str(caller.identity),
            "peer": caller.peer,
            "transport": caller.transport,
            "operation": operation,
            "key_id": scope.key_id,
            "gun": scope.gun,
            "role": scope.role,
            "token": scope.token,
            "payload_sha256": scope.payload_sha256,
            "decision": scope.decision,
            "status": status_name(status),
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        }
        line.update(scope.extra)  # e.g. a signature's purpose and content outcome
        check = getattr(outcome, "check", None)
        if isinstance(outcome, SignerdError) and isinstance(check, str):
            # A content check refused (signerd.content): which one, and its one-line reason.
            line["refused"] = {"check": check, "reason": str(outcome)}
        return outcome, line

    def run(
        self,
        context: grpc.ServicerContext,
        caller: Caller | SignerdError,
        operation: str,
        payload: bytes,
        work: Callable[[Scope], T],
    ) -> T:
        """One unary request: decide, write its audit line, then answer
        (context.abort with the error's status if it failed)."""
        if isinstance(caller, SignerdError):  # the listener could not identify the peer
            self._refuse_call(context, operation, caller, time.perf_counter())
            raise AssertionError("unreachable: context.abort raises")
        outcome, line = self.decide(caller, operation, payload, work, context)
        context.set_trailing_metadata((("x-request-id", str(line["request_id"])),))
        self._audit_or_abort(context, line)
        if isinstance(outcome, SignerdError):
            if isinstance(outcome, Unavailable):
                self._on_unavailable()
            context.abort(code_for(outcome), str(outcome))
            raise AssertionError("unreachable: context.abort raises")
        return outcome

    def run_items(
        self,
        context: grpc.ServicerContext,
        caller: Caller,
        operation: str,
        items: Sequence[tuple[bytes, Callable[[Scope], T]]],
        active: Callable[[], bool] = lambda: True,
    ) -> list[tuple[T | SignerdError, dict[str, object]]]:
        """Several requests of one streaming call (open: stream_slot): each
        (payload, work) pair waits for a work slot, is decided on its own
        and gets its own audit line; the lines are written with one write before
        any result is returned. If they cannot be written, the call fails
        closed (context.abort UNAVAILABLE). Returns each item's outcome with
        its audit line (written), in order; once ``active()`` is false (the
        client has gone: cancelled, deadline passed, server stopping) the
        items left are not signed, not audited and not returned."""
        decided: list[tuple[T | SignerdError, dict[str, object]]] = []
        for payload, work in items:
            if not active():
                break
            decided.append(self.decide(caller, operation, payload, work, context))
        self._audit_or_abort(context, *(line for _, line in decided))
        if any(isinstance(o, Unavailable) for o, _ in decided):
            self._on_unavailable()
        return decided

    def refuse_unidentified(self, context: grpc.ServicerContext, operation: str,
                            error: SignerdError) -> None:
        """Audit and refuse a streaming call whose peer is not identified.
        Raises, as context.abort does."""
        self._refuse_call(context, operation, error, time.perf_counter())


def _time_left(context: Any) -> float | None:
    """Seconds until ``context``'s deadline; None without one (or context)."""
    remaining = getattr(context, "time_remaining", None)
    return remaining() if remaining is not None else None
