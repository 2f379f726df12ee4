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
serves) and ``/readyz`` (200 only while every token is usable, else 503 with
``{"unusable": [token names]}``). It is plain HTTP, holds no key material
and accepts no signing: bind it to loopback or a scrape-only network.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
)

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


def unusable_tokens(registry: CollectorRegistry | None = None) -> list[str]:
    """Tokens whose ``signerd_token_healthy`` is 0 in ``registry`` (default:
    this process's)."""
    from prometheus_client import REGISTRY

    names = set()
    for metric in (registry or REGISTRY).collect():
        if metric.name == "signerd_token_healthy":
            names |= {s.labels["token"] for s in metric.samples if s.value < 1}
    return sorted(names)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # scrapes every few seconds would flood the log


class HttpListener:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``address`` ("HOST:PORT").

    ``unusable`` returns the names of tokens that cannot sign now; ``registry``
    is what /metrics exposes (default: this process's). Raises OSError if the
    address cannot be bound."""

    def __init__(self, address: str, unusable: Callable[[], Iterable[str]],
                 registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY

        host, _, port = address.rpartition(":")
        metrics_app = make_wsgi_app(registry or REGISTRY)
        self._unusable = unusable

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                return self._answer(start_response, 405, {"error": "only GET"})
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/livez":
                return self._answer(start_response, 200, {"status": "serving"})
            if path == "/readyz":
                down = sorted(self._unusable())
                if down:
                    return self._answer(start_response, 503, {"unusable": down})
                return self._answer(start_response, 200, {"status": "ready"})
            return self._answer(start_response, 404, {"error": "not found"})

        self._server = make_server(host.strip("[]") or "127.0.0.1", int(port), app,
                                   server_class=_Server, handler_class=_QuietHandler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @staticmethod
    def _answer(start_response: Any, code: int, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body).encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[code]
        start_response(f"{code} {reason}", [("Content-Type", "application/json"),
                                            ("Content-Length", str(len(data)))])
        return [data]

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health listening", extra={"fields": {"port": self.port}})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
