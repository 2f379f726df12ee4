"""Prometheus metrics, and the small HTTP listener that serves them with health.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/):
a ``signerd_`` prefix, ``_total`` counters, ``_seconds`` histograms in base
units. Label values come from small fixed sets (services, methods, gRPC
codes, algorithms, token names from the config, role kinds), never from
key IDs, GUNs or identities, so a scrape's size does not grow with traffic.

With ``[server] workers = N`` every worker counts into prometheus-client's
multiprocess mode (one mmap file per process in a directory the supervisor
makes, ``PROMETHEUS_MULTIPROC_DIR``, set before this module is imported),
and the supervisor serves one scrape that adds them up: counters and
histograms summed, gauges as each declares (``multiprocess_mode``):
token health is the minimum over live workers (a token is healthy only if
every worker can use it), sessions are summed, key counts the maximum.
With one process the same metrics live in the default registry.

The listener (``[metrics] listen``) answers ``/metrics`` (Prometheus text
format, written by prometheus-client), ``/livez`` (200 while the process
serves) and ``/readyz`` (200 only while everything a signature needs can
serve, else 503 saying what cannot: ``{"unusable": [token names, and "state"
for the watermark store]}``, ``{"audit": "<why>"}`` while the audit log cannot
be written (see signerd.server.app.Readiness), ``{"witness_alarms": [names]}``
while a witness refuses the audit log's checkpoints). It is plain HTTP, holds
no key material and accepts no signing: bind it to loopback or a scrape-only
network. It bounds what a peer can hold: ``[metrics] max_connections``
connections at once, each closed unanswered after ``[metrics] read_timeout``
seconds without a whole request (see HttpListener).
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("signerd.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BASE_ROLES = ("root", "targets", "snapshot", "timestamp")

REQUESTS = Counter("signerd_requests_total", "gRPC requests answered, by status code.",
                   ["service", "method", "code"])
LATENCY = Histogram("signerd_request_duration_seconds",
                    "Time from a request's arrival at its handler to its answer.", ["method"],
                    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
SIGNATURES = Counter("signerd_signatures_total", "Signatures made, by algorithm and token.",
                     ["algorithm", "token"])
DENIALS = Counter("signerd_policy_denials_total", "Requests the policy denied, by operation.",
                  ["operation"])
AUDIT_WRITES = Counter("signerd_audit_writes_total", "Audit lines written.")
AUDIT_FAILURES = Counter("signerd_audit_failures_total",
                         "Audit lines that could not be written (each failed its request).")
CHECKPOINTS = Counter("signerd_audit_checkpoints_total",
                      "Audit log checkpoints signed (signerd.audit, Transparency).")
CHECKPOINT_SIZE = Gauge("signerd_audit_checkpoint_size",
                        "Tree size (lines) of the last signed audit checkpoint.",
                        multiprocess_mode="livemax")
WITNESS_ALARM = Gauge("signerd_audit_witness_alarm",
                      "1 while a witness refuses this log's proof or checkpoint (/readyz "
                      "is then not ready), else 0.", ["witness"], multiprocess_mode="livemax")
WITNESS_SIZE = Gauge("signerd_audit_witness_size",
                     "Tree size the witness last cosigned.", ["witness"],
                     multiprocess_mode="livemin")
WITNESS_FAILURES = Counter("signerd_audit_witness_failures_total",
                           "Witness pushes that failed, by reason (unreachable, error: "
                           "retried; proof, larger, unknown, cosignature: alarms).",
                           ["witness", "reason"])
TLS_HANDSHAKE_FAILURES = Counter("signerd_tls_handshake_failures_total",
                                 "TLS handshakes that failed (reported by gRPC's core).")
PROBE_DURATION = Histogram("signerd_health_probe_duration_seconds",
                           "Time one token's health probe took.", ["token"],
                           buckets=(.0001, .0005, .001, .005, .01, .05, .1, .5, 1, 5, 30))
TOKEN_HEALTHY = Gauge("signerd_token_healthy", "1 while the token is usable, else 0.",
                      ["token"], multiprocess_mode="livemin")
SESSIONS_IN_USE = Gauge("signerd_token_sessions_in_use", "Pooled sessions borrowed now.",
                        ["token"], multiprocess_mode="livesum")
SESSIONS = Gauge("signerd_token_sessions", "Pooled sessions (the pool size).", ["token"],
                 multiprocess_mode="livesum")
# Labelled (by the store's kind: sqlite or postgresql) so that a child exists only in the
# processes that opened a store: a supervisor's own unlabelled 0 would read as "down".
STATE_HEALTHY = Gauge("signerd_state_healthy", "1 while the watermark store ([state]) answers, "
                      "else 0: metadata keys cannot sign without it.", ["store"],
                      multiprocess_mode="livemin")
# One per part of a signature besides the tokens and the watermark store (those two
# are signerd_token_healthy and signerd_state_healthy; see signerd.server.app.Readiness:
# "audit"): the supervisor's /readyz reads its workers'.
READY = Gauge("signerd_ready", "1 while this part of a signature can serve (audit: the audit "
              "log was last written), else 0.",
              ["component"], multiprocess_mode="livemin")
KEYS = Gauge("signerd_keys", "signerd keys on the token, by role (delegations as one).",
             ["token", "role"], multiprocess_mode="livemax")


@functools.lru_cache(maxsize=1024)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client's labels()
    takes a lock and builds its key on every call, and the signing path
    asks for the same few children on every request."""
    return metric.labels(*labels)


def role_kind(role: str) -> str:
    """A role as a label value: the base role, or "delegation"."""
    return role if role in BASE_ROLES else "delegation"


def multiprocess_registry() -> CollectorRegistry:
    """The registry a supervisor scrapes: every worker's figures added up."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def process_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


STATE_NAME = "state"  # what /readyz lists when the watermark store does not answer


def unusable_tokens(registry: CollectorRegistry | None = None) -> list[str]:
    """Tokens whose ``signerd_token_healthy`` is 0 in ``registry`` (default:
    this process's), and ``"state"`` when ``signerd_state_healthy`` is 0."""
    from prometheus_client import REGISTRY

    names = set()
    for metric in (registry or REGISTRY).collect():
        if metric.name == "signerd_token_healthy":
            names |= {s.labels["token"] for s in metric.samples if s.value < 1}
        elif metric.name == "signerd_state_healthy" and any(s.value < 1 for s in metric.samples):
            names.add(STATE_NAME)
    return sorted(names)


def witness_alarms(registry: CollectorRegistry | None = None) -> list[str]:
    """Witnesses whose ``signerd_audit_witness_alarm`` is set in ``registry``
    (default: this process's)."""
    from prometheus_client import REGISTRY

    names = set()
    for metric in (registry or REGISTRY).collect():
        if metric.name == "signerd_audit_witness_alarm":
            names |= {s.labels["witness"] for s in metric.samples if s.value >= 1}
    return sorted(names)


def not_ready(registry: CollectorRegistry | None = None) -> dict[str, object]:
    """What keeps the processes counting into ``registry`` (default: this
    process's) from signing, as /readyz says it: ``{"unusable": [tokens]}``
    and ``{component: "not ready"}`` for each ``signerd_ready`` that is 0
    (a supervisor sees its workers' gauges, not their reasons: their logs
    have those). Empty when ready."""
    from prometheus_client import REGISTRY

    body: dict[str, object] = {}
    down = unusable_tokens(registry)
    if down:
        body["unusable"] = down
    for metric in (registry or REGISTRY).collect():
        if metric.name == "signerd_ready":
            for sample in metric.samples:
                if sample.value < 1:
                    body[sample.labels["component"]] = "not ready (see the worker's log)"
    return body


HTTP_REFUSED = Counter("signerd_http_connections_refused_total",
                       "Connections to the metrics listener closed unanswered, by reason "
                       "(slow: the request did not arrive within the read timeout; bad: it "
                       "was too large or broken).",
                       ["reason"])
_MAX_HEAD = 8192  # bytes of request line and headers; a scrape sends a few hundred
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 422: "Unprocessable Entity", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class HttpListener:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``address`` ("HOST:PORT").

    ``not_ready`` says what keeps the daemon from signing now, by part
    (empty when ready; the body of a 503 /readyz, see :func:`not_ready`);
    ``registry`` is what /metrics exposes (default: this process's). Raises OSError if the
    address cannot be bound.

    One asyncio event loop on one thread holds the connections, so a held
    connection costs a file descriptor and a few KB, never a thread: at most
    ``max_connections`` at once (more are closed at once), each given
    ``read_timeout`` seconds from its accept to send its whole request head
    (at most 8 KB), and as long again to take the answer. While it holds
    ``max_connections`` it accepts no more: new ones wait in the kernel's
    backlog. Answers are made by
    ``workers`` threads (prometheus-client's exposition and the token check
    are blocking calls). One request per connection (``Connection: close``).

    Why not wsgiref or prometheus-client's own server: both take a thread
    per connection with no read timeout and no cap (4,000 slow connections
    made 4,016 threads and 185 MB, and 1,018 of them used up the open-file
    limit of a default systemd service and with it the token's files).
    The parsing is the standard library's (``http.client.parse_headers``)."""

    def __init__(self, address: str, not_ready: Callable[[], Mapping[str, object]],
                 registry: CollectorRegistry | None = None, *, max_connections: int = 64,
                 read_timeout: float = 5.0, workers: int = 2,
                 routes: Callable[[str], tuple[int, bytes, str] | None] | None = None,
                 alarms: Callable[[], Iterable[str]] | None = None) -> None:
        from prometheus_client import REGISTRY

        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._registry = registry or REGISTRY
        self._not_ready = not_ready
        # More GET paths (the audit log's /checkpoint and /tile/...: signerd.audit),
        # and alarms that make /readyz not ready (witnesses refusing the audit log).
        self._routes = routes
        self._alarms = alarms or (lambda: witness_alarms(self._registry))
        self._max = max_connections
        self._timeout = read_timeout
        self.open = 0  # connections held now (read on the loop thread, or for tests)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, int(port)), family=family, backlog=128)
        except OSError as e:  # create_server appends the address to strerror: callers name it
            raise OSError(e.errno, os.strerror(e.errno) if e.errno else str(e)) from None
        self.port = int(self._sock.getsockname()[1])
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="metrics-answer")
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._accept())
        self._loop.close()

    async def _accept(self) -> None:
        """Accept while fewer than ``max_connections`` are held. When full it
        stops accepting: later connections wait in the kernel's backlog (then
        their SYNs are dropped), costing the daemon no file descriptor and no
        CPU, where accepting and closing them would cost both."""
        self._stopped = asyncio.Event()
        slots = asyncio.Semaphore(self._max)
        self._sock.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        stopping = asyncio.ensure_future(self._stopped.wait())
        try:
            while True:
                acquired = asyncio.ensure_future(slots.acquire())
                await asyncio.wait((acquired, stopping), return_when=asyncio.FIRST_COMPLETED)
                if stopping.done():
                    acquired.cancel()
                    return
                accepted = asyncio.ensure_future(self._loop.sock_accept(self._sock))
                await asyncio.wait((accepted, stopping), return_when=asyncio.FIRST_COMPLETED)
                if stopping.done():
                    accepted.cancel()
                    return
                try:
                    conn, _ = accepted.result()
                except OSError:  # EMFILE and the like: try again shortly, never spin
                    slots.release()
                    await asyncio.sleep(0.1)
                    continue
                task = asyncio.ensure_future(self._serve(conn, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self._sock.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, conn: socket.socket, slots: asyncio.Semaphore) -> None:
        self.open += 1
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=_MAX_HEAD)
            try:
                first = await asyncio.wait_for(reader.readexactly(1), self._timeout)
                if not first.isalpha():  # no HTTP method: a TLS ClientHello, say
                    # Answer at once, as http.server does a bad request line: a client
                    # that dialled this port for gRPC learns it is not TLS (signerctl
                    # says so) instead of waiting out the read timeout.
                    HTTP_REFUSED.labels("bad").inc()
                    writer.write(self._response(400, {"error": "bad request"}, head=False))
                    await asyncio.wait_for(writer.drain(), self._timeout)
                    return
                head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                                      self._timeout)
            except TimeoutError:
                HTTP_REFUSED.labels("slow").inc()
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                HTTP_REFUSED.labels("bad").inc()
                return
            answer = await self._loop.run_in_executor(self._pool, self._answer_bytes, head)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), self._timeout)
        except (TimeoutError, OSError):
            pass  # a peer that does not read its answer, or went away
        finally:
            self.open -= 1
            if writer is not None:
                writer.transport.abort()
            else:
                conn.close()
            slots.release()

    def _answer_bytes(self, head: bytes) -> bytes:
        """The whole HTTP/1.1 response to one request head."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._response(400, {"error": "bad request"}, head=False)
        method, target, _ = parts
        try:
            headers = http.client.parse_headers(io.BytesIO(rest))
        except http.client.HTTPException:  # over 100 header lines, or one too long
            HTTP_REFUSED.labels("bad").inc()
            return self._response(431, {"error": "request header fields too large"},
                                  head=False)
        if method not in ("GET", "HEAD"):
            return self._response(405, {"error": "only GET"}, head=False)
        path = urllib.parse.urlsplit(target).path
        only_head = method == "HEAD"
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("Accept", ""))
            return self._response(200, encoder(self._registry), head=only_head,
                                  content_type=content_type)
        if path == "/livez":
            return self._response(200, {"status": "serving"}, head=only_head)
        if path == "/readyz":
            down = dict(self._not_ready())
            alarms = sorted(self._alarms())
            if alarms:
                down["witness_alarms"] = alarms
            if down:
                return self._response(503, down, head=only_head)
            return self._response(200, {"status": "ready"}, head=only_head)
        routed = self._routes(path) if self._routes is not None else None
        if routed is not None:
            code, data, content_type = routed
            return self._response(code, data, head=only_head, content_type=content_type)
        return self._response(404, {"error": "not found"}, head=only_head)

    @staticmethod
    def _response(code: int, body: dict[str, Any] | bytes, *, head: bool,
                  content_type: str = "application/json") -> bytes:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"HTTP/1.1 {code} {_REASONS[code]}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(data)}", "Connection: close", "", ""]
        return "\r\n".join(lines).encode() + (b"" if head else data)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health listening", extra={"fields": {
            "port": self.port, "max_connections": self._max, "read_timeout": self._timeout}})

    def stop(self) -> None:
        if self._thread.is_alive():
            while self._stopped is None:  # the loop has not reached main() yet
                time.sleep(0.01)
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        else:
            self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
