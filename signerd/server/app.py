"""Build signerd's gRPC servers: listeners, servicers, health and reflection."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from signerd import fdbudget, metrics
from signerd.audit import AuditLog, Checkpointer, CheckpointKey, tree_dir
from signerd.config import Config, is_loopback
from signerd.errors import ConfigError, SignerdError, Unavailable
from signerd.notary import signer_pb2 as notary_pb2
from signerd.policy import PolicyStore
from signerd.server import _aio, notary
from signerd.server._fair import Admission
from signerd.server._gate import Caller, Gate
from signerd.server._identity import UnixPeers, dev_caller, tls_caller
from signerd.server._unix import UnixRelay
from signerd.server.v1 import SignerServicer
from signerd.service import (
    KeyService,
    NoCheckpointToken,
    checkpoint_key,
    choose_after_serving,
)
from signerd.trusted_files import audit_location_problem, warn_if_exposed
from signerd.v1 import signer_pb2, signer_pb2_grpc

log = logging.getLogger("signerd.server")

_GAUGES_EVERY = 1.0  # seconds between refreshes of the token gauges
V1_SERVICE = signer_pb2.DESCRIPTOR.services_by_name["SignerService"].full_name
Identify = Callable[[grpc.ServicerContext], Caller | SignerdError]


def _known_service(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindServiceByName(name)
    except KeyError:
        return False
    return True


def _options(config: Config, max_connections: int) -> list[tuple[str, int]]:
    return [
        # Oversized requests are refused by gRPC itself with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes * 2),
        # Only a supervisor's workers share the port (SO_REUSEPORT): on by
        # default in gRPC, it would let any other process of the same user bind
        # a port signerd holds and take half of its connections.
        ("grpc.so_reuseport", 1 if config.shares_port else 0),
        ("grpc.max_concurrent_streams", 1024),
        # A connection that never finishes its TLS handshake is closed after
        # this (gRPC's default is 120 s); and at most this many at once
        # (the listener's share of the file descriptors: signerd.fdbudget).
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", max_connections),
    ]


class Readiness:
    """Whether this process can sign now: everything a signature needs, each
    asked in turn. What /readyz answers (200, or 503 with what is not
    ready) and gRPC health says (SERVING or NOT_SERVING, every service).

    A signature needs its token, an audit line (fail closed: signerd.audit)
    and, once the content guard is wired in, its watermark store. So:

    * ``unusable``: the tokens that cannot sign (KeyService.unusable);
    * ``audit``: why the audit log cannot be written. Its last write failed
      (a full disk, say): not ready until a write succeeds. The health loop
      tries one every ``health_interval`` (AuditLog.probe), since a daemon
      that is not ready gets no requests to try with;
    * any part added with :meth:`add`. The hook for the watermark store:
      ``servers.readiness.add("watermarks", store_check)``, where
      ``store_check`` returns why the store cannot be used now, or None
      (cheap: it runs on every /readyz and health update).

    Each part besides the tokens is also the gauge ``signerd_ready``
    (label ``component``), which a supervisor's /readyz reads."""

    def __init__(self, service: KeyService, audit: AuditLog | None) -> None:
        self._service = service
        self._checks: dict[str, Callable[[], str | None]] = {}
        if audit is not None:
            self.add("audit", lambda: audit.failure)

    def add(self, name: str, check: Callable[[], str | None]) -> None:
        """Make ``check`` (why part ``name`` cannot serve now, or None) part
        of readiness. ``name`` must not be ``unusable`` (the tokens' key)."""
        if name == "unusable" or name in self._checks:
            raise ValueError(f"readiness part {name!r} is taken")
        self._checks[name] = check

    def not_ready(self) -> dict[str, object]:
        """What keeps this process from signing now, by part; empty when ready."""
        body: dict[str, object] = {}
        down = sorted(self._service.unusable())
        if down:
            body["unusable"] = down
        for name, check in self._checks.items():
            why = check()
            metrics.child(metrics.READY, name).set(0 if why else 1)
            if why:
                body[name] = why
        return body


@dataclass
class Servers:
    """The running servers of one daemon process."""

    servers: list[Any]  # grpc.Server, or grpc.aio.Server on ``loop``
    health: Any  # health.HealthServicer; its grpc.aio twin on the aio engine
    service: KeyService
    gate: Gate
    policy: PolicyStore
    audit: AuditLog | None
    relay: UnixRelay | None
    ports: dict[str, int] = field(default_factory=dict)
    health_names: set[str] = field(default_factory=set)
    health_interval: float = 5.0
    metrics_listen: str | None = None
    budget: fdbudget.Budget | None = None
    metrics_read_timeout: float = 5.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _health_thread: threading.Thread | None = None
    _gauges_thread: threading.Thread | None = None
    http: metrics.HttpListener | None = None
    loop: _aio.Loop | None = None  # the aio engine's event loop
    checkpointer: Checkpointer | None = None  # the audit log's checkpoints (signerd.audit)
    readiness: Readiness = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = Readiness(self.service, self.audit)
        if self.checkpointer is not None:  # e.g. a recorded checkpoint key not on its token
            self.readiness.add("audit_checkpoints", self.checkpointer.failure)

    def start(self) -> None:
        """Start serving; raises Unavailable if the metrics address is taken
        (a retry may find it free), ConfigError if it cannot be bound."""
        if self.metrics_listen is not None:
            try:
                self.http = metrics.HttpListener(
                    self.metrics_listen, self.readiness.not_ready,
                    max_connections=self.budget.metrics if self.budget else 64,
                    read_timeout=self.metrics_read_timeout,
                    routes=self.checkpointer.serve if self.checkpointer else None)
            except OSError as e:
                # Nothing has started: close what open_servers opened (the tokens'
                # logins and the audit log), as a stop would.
                self.service.close()
                if self.audit is not None:
                    self.audit.close()
                if self.checkpointer is not None:
                    self.checkpointer.stop()
                if self.relay is not None:
                    self.relay.remove_private()
                error = Unavailable if e.errno == errno.EADDRINUSE else ConfigError
                raise error(f"cannot listen on metrics.listen {self.metrics_listen}: "
                            f"{e.strerror}") from None
        if self.checkpointer is not None and self.audit is not None:
            self.checkpointer.start(self.audit)
        for s in self.servers:
            if self.loop is not None:
                self.loop.run(s.start())
            else:
                s.start()
        if self.relay is not None:
            self.relay.start()
        self._health_thread = threading.Thread(target=self._watch_health, name="health",
                                               daemon=True)
        self._health_thread.start()
        self._gauges_thread = threading.Thread(target=self._watch_gauges, name="gauges",
                                               daemon=True)
        self._gauges_thread.start()
        if self.http is not None:
            self.http.start()

    def _watch_gauges(self) -> None:
        """Keep the token gauges current (every _GAUGES_EVERY seconds): with
        workers, a scrape reads them from every worker's file, not from code."""
        while True:
            self.service.export_gauges()
            self.readiness.not_ready()  # sets signerd_ready
            if self._stop.wait(_GAUGES_EVERY):
                return

    def update_health(self) -> None:
        """Set gRPC health (every service) to what :class:`Readiness` says."""
        ok = not self.readiness.not_ready()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        names = ("", *sorted(self.health_names))
        if self.loop is not None:
            # The aio servicer's set() is a coroutine of the loop. Not awaited:
            # this also runs on the loop thread (a failing inline Sign).
            servicer = self.health

            async def set_all() -> None:
                for name in names:
                    await servicer.set(name, status)

            self.loop.submit(set_all())
            return
        for name in names:
            self.health.set(name, status)

    def _watch_health(self) -> None:
        while not self._stop.wait(self.health_interval):
            self.service.check()
            if self.audit is not None:
                self.audit.probe()  # after a failed write: can it be written again?
            self.update_health()

    def stop(self, grace: float = 10.0) -> None:
        """Finish in-flight requests (up to ``grace`` seconds), then close tokens."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.loop is not None:
            if self.loop.running:  # not stopped before
                async def stop_all() -> None:
                    await asyncio.gather(*(s.stop(grace) for s in self.servers))

                self.loop.run(stop_all())
                self.loop.close()
        else:
            events = [s.stop(grace) for s in self.servers]
            for e in events:
                e.wait()
        if self.relay is not None:
            self.relay.remove_private()
        # gRPC's stop cancels what is left after the grace period, but does
        # not wait for handlers to return: a stream may be signing its round's
        # next item. Tokens and the audit log close only once they are done.
        if not self.gate.wait_idle(grace):
            log.warning("requests still running after the grace period; closing the tokens "
                        "and the audit log anyway")
        if self._health_thread is not None:  # a probe must not run into closing tokens
            self._health_thread.join(grace)
            if self._health_thread.is_alive():
                log.warning("a token health probe is still running; closing the tokens anyway")
        if self.checkpointer is not None:  # a last checkpoint of every line, signed
            self.checkpointer.stop()
        self.service.close()
        if self.audit is not None:
            self.audit.close()


class _Requests(grpc.ServerInterceptor):
    """Every method of every service this server serves (signerd.v1, the
    Notary-compatible ones, health, reflection) gets its request bytes raw
    and decodes them here, and every answered unary request is counted by
    service, method and status code, and timed (signerd.metrics).

    Why decoding is ours: when grpcio's own deserializer fails it answers
    INTERNAL "Exception deserializing request!" and keeps an HTTP/2 stream
    slot and about 19 KB per such request (1,024 of them made a connection
    refuse every later call). A request that does not decode is answered
    INVALID_ARGUMENT here, with a short message, and audited. Requests that
    never reach a handler (an unknown method) are neither decoded nor
    counted."""

    def __init__(self, reject: Callable[[grpc.ServicerContext, str, str], None]) -> None:
        self._reject = reject
        self._wrapped: dict[str, Any] = {}

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = _aio.remember(self._wrapped, details,
                                    self._wrap(continuation(details), details))
        return wrapped

    def _wrap(self, handler: Any, details: Any) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        decode = _aio.decoder(handler, details.method, self._reject)

        def decoded_stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            if details.method == _aio.SIGN_STREAM:  # an item that does not decode fails alone
                for raw in raws:
                    yield _aio.decode_sign_request(raw)
                return
            for raw in raws:
                yield decode(raw, context)

        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            requests, latency = metrics.REQUESTS, metrics.LATENCY.labels(method)

            def counted(raw: bytes, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                try:
                    result = inner(decode(raw, context), context)
                    code = context.code() or grpc.StatusCode.OK  # type: ignore[attr-defined]
                    return result
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                    raise
                finally:
                    latency.observe(time.perf_counter() - start)
                    metrics.child(requests, service, method, code.name).inc()

            return grpc.unary_unary_rpc_method_handler(counted, response_serializer=serializer)
        if handler.unary_stream is not None:
            stream = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda raw, context: stream(decode(raw, context), context),
                response_serializer=serializer)
        if handler.stream_unary is not None:
            collect = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda raws, context: collect(decoded_stream(raws, context), context),
                response_serializer=serializer)
        both = handler.stream_stream

        def streamed(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from both(decoded_stream(raws, context), context)
            finally:
                _aio.count_failed_call(service, method, context.code())  # type: ignore[attr-defined]

        return grpc.stream_stream_rpc_method_handler(streamed, response_serializer=serializer)


class _OnLoop:
    """A grpc.aio server being built: its port methods run on its loop thread
    (grpc.aio objects are used only on the thread of their loop)."""

    def __init__(self, loop: _aio.Loop, server: grpc.aio.Server) -> None:
        self._loop = loop
        self._server = server

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._loop.call(lambda: self._server.add_secure_port(address, credentials))

    def add_insecure_port(self, address: str) -> int:
        return self._loop.call(lambda: self._server.add_insecure_port(address))


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    tls = config.tls
    if tls is None or tls.client_ca is None:
        raise ConfigError(
            "a TCP listener needs [tls] cert, key and client_ca (mutual TLS); "
            "plaintext is only for dev_plaintext on loopback"
        )
    warn_if_exposed(tls.key, "TLS private key")
    try:
        key, cert, ca = tls.key.read_bytes(), tls.cert.read_bytes(), tls.client_ca.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read TLS file {e.filename}: {e.strerror}") from None
    # gRPC's TLS stack negotiates TLS 1.2 or 1.3 only; require_client_auth
    # makes the handshake fail without a certificate issued by client_ca.
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def open_servers(config: Config) -> Servers:
    """Open the configured tokens and build (not start) the servers over them."""
    service = KeyService.open(config)
    try:
        return build(config, service)
    except BaseException:
        service.close()
        raise


def _open_audit(config: Config,
                service: KeyService) -> tuple[AuditLog | None, Checkpointer | None]:
    """The audit log and, with ``[audit] checkpoints`` (the default), its
    checkpointer with the checkpoint key. ConfigError refuses the start,
    e.g. a log that does not extend its last checkpoint."""
    if config.audit_file is None:
        return None, None
    problem = audit_location_problem(config.audit_file)
    if problem is not None:
        raise ConfigError(f"audit.file: {problem}")
    if not config.audit_tlog.enabled:
        return AuditLog(config.audit_file), None
    tlog, audit_file = config.audit_tlog, config.audit_file
    had_tree = tree_dir(audit_file).exists()  # before a first start reserves its own

    def choose() -> CheckpointKey | None:
        try:
            return checkpoint_key(service, tlog, audit_file)
        except NoCheckpointToken as e:
            # Checkpoints by default, where a token can make their key (Ed25519, else
            # ECDSA P-256): a daemon on tokens that can make neither still starts,
            # saying so. One that asked for them, or whose log already has a tree, is
            # refused: a tree once kept is not dropped silently (its start check is
            # what catches a rewrite).
            if tlog.explicit or had_tree:
                raise
            log.warning("audit checkpoints off: no token can make their key", extra={
                "fields": {"why": str(e)}})
            return None

    if choose_after_serving(service, tlog, audit_file):
        checkpointer = Checkpointer(None, tlog, metrics, choose=choose)
        return AuditLog(audit_file, tree=checkpointer), checkpointer
    key = choose()
    if key is None:
        return AuditLog(audit_file), None
    checkpointer = Checkpointer(key, tlog, metrics)
    return AuditLog(audit_file, tree=checkpointer), checkpointer


def build(config: Config, service: KeyService) -> Servers:
    """Build (but do not start) the servers for ``config``."""
    if config.policy_file is None:
        raise ConfigError("[policy] file is required: signerd denies everything without a policy")
    policy = PolicyStore(config.policy_file)
    audit, checkpointer = _open_audit(config, service)
    loop = _aio.Loop() if config.engine == "aio" else None
    # The sync servicer's Watch blocks a thread until its call ends, and
    # grpc.aio never ends it (a thread lost per Watch): the aio engine uses
    # grpc_health's own aio servicer.
    health_servicer: Any = (health.HealthServicer(experimental_non_blocking=True)
                            if loop is None else loop.call(health.aio.HealthServicer))
    servers: list[Any] = []
    holder: dict[str, Servers] = {}
    max_streams = max(1, config.threads // 2)
    admission = Admission(config.threads, config.inflight_reserve, config.inflight_limit,
                          config.queue_limit, max_streams)
    gate = Gate(policy, audit, admission,
                on_unavailable=lambda: holder["s"].update_health())
    too_high = config.inflight_warning()
    if too_high is not None:
        log.warning(too_high, extra={"fields": {
            "threads": config.threads, "max_inflight_per_identity": config.inflight_limit}})
    ports: dict[str, int] = {}
    health_names = {V1_SERVICE}
    budget = fdbudget.plan(fdbudget.raise_limit(), len(config.tokens), audit is not None, {
        "tcp": config.max_connections if config.listen else 0,
        "unix": config.max_unix_connections if config.unix_socket is not None else 0,
        "metrics": config.metrics_max_connections if config.metrics_listen else 0})

    # config.threads requests work at once (the admission's slots). The
    # threads engine's pool has a thread more for each request that may wait
    # for a slot and each stream that may be open, since both hold their
    # handler thread, and two for calls the gate never sees (health,
    # reflection): a new caller always finds a thread to reach the gate. The
    # aio engine waits on its loop and runs only admitted work here.
    pool = config.threads if loop is not None else (
        config.threads + config.queue_limit + max_streams + 2)
    executor = futures.ThreadPoolExecutor(max_workers=pool, thread_name_prefix="grpc-handler")

    def inline(method: str, request: Any) -> bool:
        """Whether the aio engine answers this call on its loop thread."""
        if method != "Sign":
            return False
        if isinstance(request, signer_pb2.SignRequest):
            return service.signs_fast(request.key_id)
        if isinstance(request, notary_pb2.SignatureRequest):
            return service.signs_fast(request.keyID.ID)
        return False

    def make(identify: Identify, max_connections: int) -> Any:
        servicer = SignerServicer(service, gate, identify)
        if loop is None:
            server = grpc.server(executor, options=_options(config, max_connections),
                                 interceptors=[_Requests(gate.reject_undecodable)])
            register(server, servicer, identify)
            servers.append(server)
            return server
        requests = _aio.Requests(
            gate.reject_undecodable, executor, inline,
            functools.partial(_aio.sign_stream, identify, gate.refuse_unidentified,
                              gate.stream_slot, servicer.sign_items, inline, executor,
                              admission),
            functools.partial(_aio.admit, identify, admission), admission.release)

        def create() -> Any:
            aio_server = grpc.aio.server(migration_thread_pool=executor,
                                         options=_options(config, max_connections),
                                         interceptors=[requests])
            register(aio_server, servicer, identify)
            return aio_server

        aio_server = loop.call(create)
        servers.append(aio_server)
        return _OnLoop(loop, aio_server)

    def register(server: Any, servicer: SignerServicer, identify: Identify) -> None:
        signer_pb2_grpc.add_SignerServiceServicer_to_server(servicer, server)
        names = [V1_SERVICE, *notary.add_to_server(server, service, gate, identify)]
        health_names.update(names)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )

    if config.listen:
        if config.dev_plaintext:
            if not is_loopback(config.listen.rsplit(":", 1)[0].strip("[]")):
                raise ConfigError(f"dev_plaintext is allowed only on loopback, not {config.listen}")
            log.warning(
                "plaintext development listener: no TLS, every caller is dev:loopback",
                extra={"fields": {"listen": config.listen}},
            )
            ports["tcp"] = make(dev_caller, budget.tcp).add_insecure_port(config.listen)
        else:
            ports["tcp"] = make(tls_caller, budget.tcp).add_secure_port(
                config.listen, _tls_credentials(config))
        if ports["tcp"] == 0:
            raise ConfigError(f"cannot listen on {config.listen}")
    relay = None
    if config.unix_socket is not None:
        peers = UnixPeers()
        relay = UnixRelay(config.unix_socket, peers, max_connections=budget.unix)
        # gRPC's own cap on the private listener stays above the relay's, so
        # it never refuses a connection the relay has accepted.
        if make(peers.caller, budget.unix + 1).add_insecure_port(relay.internal) == 0:
            relay.remove_private()
            raise ConfigError(f"cannot listen on the relay's private socket {relay.internal}")
    if not servers:
        raise ConfigError("configure at least one listener: server.listen or server.unix_socket")
    result = Servers(
        servers,
        health_servicer,
        service,
        gate,
        policy,
        audit,
        relay,
        ports,
        health_names,
        config.health_interval,
        config.metrics_listen,
        budget,
        config.metrics_read_timeout,
        loop=loop,
        checkpointer=checkpointer,
    )
    holder["s"] = result
    if audit is not None:  # health follows the audit log at once, not at the next probe
        audit.on_change = result.update_health
    result.update_health()
    return result
