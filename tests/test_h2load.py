"""bench/_h2load.py, the lean load generator, against a real daemon over mutual TLS.

It never decodes HPACK, so these check what it relies on: an answered call
brings the response message, an error (Trailers-Only) brings none, large
requests respect HTTP/2 flow control, and SETTINGS/PING from grpc's server
do not stall it. Its streaming mode (SignStream) is checked against a small
grpcio servicer of the tests' own, since signerd's SignStream may not exist yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from bench import _h2load
from signerd import signing
from signerd.keys import parse_algorithm
from signerd.v1 import signer_pb2 as pb
from tests.conftest import daemon_config, start_daemon, unique_gun

SIGN = "/signerd.v1.SignerService/Sign"
SIGN_STREAM = "/signerd.v1.SignerService/SignStream"


def _connections(daemon: Any, n: int) -> list[_h2load.Connection]:
    cfg = daemon.client_config()
    ctx = _h2load.context(str(cfg.ca), str(cfg.cert), str(cfg.key))
    return [_h2load.Connection("127.0.0.1", daemon.port, "localhost", ctx) for _ in range(n)]


def _run(conns: list[_h2load.Connection], path: str, request: bytes, callers: int,
         seconds: float) -> list[bytes | None]:
    answers: list[bytes | None] = []
    _h2load.run_closed_loop(conns, callers, _h2load.header_block(path, "localhost"), request,
                            time.monotonic() + seconds, lambda t0, t1, body: answers.append(body))
    return answers


def test_answers_are_real_signatures_and_errors_are_counted(daemon: Any) -> None:
    key = daemon.client().create_key(unique_gun(), "targets", purpose="raw")
    conns = _connections(daemon, 2)
    try:
        message = b"signed through raw HTTP/2"
        ok = _run(conns, SIGN, pb.SignRequest(key_id=key.key_id, message=message)
                  .SerializeToString(), callers=4, seconds=0.5)
        assert len(ok) >= 4 and all(body is not None for body in ok)
        for body in ok[:3]:
            assert body is not None
            resp = pb.SignResponse.FromString(body)
            signing.verify(key.public_key_der, parse_algorithm(key.algorithm), resp.signature,
                           message, signing.SignOptions())

        unknown = pb.SignRequest(key_id="ab" * 32, message=b"x").SerializeToString()
        failed = _run(conns, SIGN, unknown, callers=3, seconds=0.3)
        assert failed and all(body is None for body in failed)  # NOT_FOUND: no message
    finally:
        for c in conns:
            c.close()


def test_large_batches_respect_flow_control(daemon: Any) -> None:
    """Each request is ~600 KB: far past HTTP/2's initial 64 KB windows."""
    key = daemon.client().create_key(unique_gun(), "targets", purpose="raw")
    one = pb.SignRequest(key_id=key.key_id, message=bytes(600))
    batch = pb.SignBatchRequest(requests=[one] * 1000).SerializeToString()
    assert len(batch) > 600_000
    conns = _connections(daemon, 1)
    try:
        answers = _run(conns, "/signerd.v1.SignerService/SignBatch", batch, callers=2,
                       seconds=0.2)
    finally:
        conns[0].close()
    assert len(answers) >= 2
    for body in answers:
        assert body is not None
        items = pb.SignBatchResponse.FromString(body).items
        assert len(items) == 1000 and all(i.code == 0 for i in items)


def test_message_framing_and_failed_streams() -> None:
    assert _h2load.message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    done = _h2load._Stream(0.0, memoryview(b""), 0, lambda s: None,
                           bytearray(_h2load.message(b"answer")))
    assert _h2load.response_body(done) == b"answer"
    done.reset = True
    assert _h2load.response_body(done) is None
    assert _h2load.response_body(_h2load._Stream(0.0, memoryview(b""), 0, lambda s: None)) is None


def test_a_hung_up_runner_lets_the_daemon_stop_at_once(
        hsm: Any, certs: Any, tmp_path: Path) -> None:
    """Between runs nothing reads the runner's connections, so they never
    answer the GOAWAY of a stopping server, which then waits its whole grace
    period (the 10,000-key bench daemon took 10.4 s to stop). hang_up closes
    them first."""
    from bench._loadgen import Point, Target, _H2Runner

    d = start_daemon(daemon_config(hsm, certs, tmp_path), certs, tmp_path)
    runner = _H2Runner(channels=2)
    try:
        key = d.client().create_key(unique_gun(), "targets", purpose="raw")
        cfg = d.client_config()
        target = Target(f"127.0.0.1:{d.port}", cfg.ca, cfg.cert, cfg.key)
        request = pb.SignRequest(key_id=key.key_id, message=b"x").SerializeToString()
        result = runner.run(Point(target, "v1", request, 1, 2, time.monotonic(), 0.0, 0.3))
        assert result.items > 0 and result.errors == 0
        runner.hang_up(target)
        assert runner.conns == {}
    finally:
        t0 = time.monotonic()
        d.servers.stop(grace=20)
        took = time.monotonic() - t0
        runner.close()
    assert took < 10  # not the grace period


# -- streaming (SignStream): one stream per caller, ``depth`` requests outstanding --------


class _StreamServicer:
    """A SignStream that answers each request, in order, with an item whose
    signature is the request's message, ``group`` items per response message
    (as signerd answers requests that arrived together); ``fail_after``
    aborts a stream after that many requests, ``bad_every`` answers every
    n-th request with code 5."""

    def __init__(self, fail_after: int = 0, bad_every: int = 0, group: int = 1) -> None:
        self.fail_after, self.bad_every, self.group = fail_after, bad_every, group
        self.lock = threading.Lock()
        self.calls = self.requests = self.half_closed = 0

    def __call__(self, requests: Iterator[bytes], context: grpc.ServicerContext
                 ) -> Iterator[bytes]:
        with self.lock:
            self.calls += 1
        items: list[pb.SignBatchItem] = []
        for n, raw in enumerate(requests, 1):
            with self.lock:
                self.requests += 1
            if self.fail_after and n > self.fail_after:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
            code = 5 if self.bad_every and n % self.bad_every == 0 else 0
            signed = pb.SignResponse(signature=pb.SignRequest.FromString(raw).message)
            items.append(pb.SignBatchItem(code=code, response=signed))
            if len(items) == self.group:
                yield pb.SignStreamResponse(items=items).SerializeToString()
                items = []
        if items:
            yield pb.SignStreamResponse(items=items).SerializeToString()
        with self.lock:
            self.half_closed += 1  # the client ended its side: the loop above finished


@contextmanager
def _stream_server(certs: Any, servicer: _StreamServicer) -> Iterator[int]:
    cert, key = certs.files["server"]
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=certs.ca_file.read_bytes(),
                                        require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "signerd.v1.SignerService",
        {"SignStream": grpc.stream_stream_rpc_method_handler(servicer)})])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def _stream_connections(certs: Any, port: int, n: int) -> list[_h2load.Connection]:
    cert, key = certs.files["admin"]
    ctx = _h2load.context(str(certs.ca_file), str(cert), str(key))
    return [_h2load.Connection("127.0.0.1", port, "localhost", ctx) for _ in range(n)]


def _run_streams(conns: list[_h2load.Connection], request: bytes, callers: int, depth: int,
                 seconds: float) -> list[tuple[float, float, int | None]]:
    from bench._loadgen import _stream_codes

    answers: list[tuple[float, float, int | None]] = []
    try:
        _h2load.run_streaming(conns, callers, _h2load.header_block(SIGN_STREAM, "localhost"),
                              request, depth, time.monotonic() + seconds, _stream_codes,
                              lambda t0, t1, code: answers.append((t0, t1, code)))
    finally:
        for c in conns:
            c.close()
    return answers


def test_each_streaming_caller_keeps_one_stream_and_every_request_is_answered(
        certs: Any) -> None:
    servicer = _StreamServicer()
    with _stream_server(certs, servicer) as port:
        request = pb.SignRequest(key_id="k", message=b"in order").SerializeToString()
        answers = _run_streams(_stream_connections(certs, port, 2), request, callers=3, depth=4,
                               seconds=0.4)
    assert servicer.calls == 3  # one stream per caller for the whole window
    assert servicer.half_closed == 3  # each ended its side once its answers were in
    assert len(answers) == servicer.requests > 3 * 4
    for t0, t1, code in answers:
        assert code == 0 and t0 <= t1


def test_several_answers_in_one_response_message_are_each_counted(certs: Any) -> None:
    servicer = _StreamServicer(group=2, bad_every=3)
    with _stream_server(certs, servicer) as port:
        request = pb.SignRequest(key_id="k", message=b"x").SerializeToString()
        answers = _run_streams(_stream_connections(certs, port, 1), request, callers=1, depth=4,
                               seconds=0.3)
    assert len(answers) == servicer.requests >= 8
    codes = [code for _, _, code in answers]
    assert codes[:6] == [0, 0, 5, 0, 0, 5]


def test_streamed_requests_respect_flow_control(certs: Any) -> None:
    """Eight 100 KB requests outstanding on one stream: far past HTTP/2's
    initial 64 KB windows."""
    servicer = _StreamServicer()
    with _stream_server(certs, servicer) as port:
        request = pb.SignRequest(key_id="k", message=bytes(100_000)).SerializeToString()
        answers = _run_streams(_stream_connections(certs, port, 1), request, callers=1, depth=8,
                               seconds=0.3)
    assert len(answers) == servicer.requests >= 8
    assert all(code == 0 for _, _, code in answers)


def test_a_failed_stream_fails_its_outstanding_requests_and_the_caller_opens_another(
        certs: Any) -> None:
    servicer = _StreamServicer(fail_after=5)
    with _stream_server(certs, servicer) as port:
        request = pb.SignRequest(key_id="k", message=b"x").SerializeToString()
        answers = _run_streams(_stream_connections(certs, port, 1), request, callers=1, depth=4,
                               seconds=0.3)
    assert servicer.calls > 1
    ok = [a for a in answers if a[2] is not None]
    failed = [a for a in answers if a[2] is None]
    assert ok and failed
    # Five answered per stream (the last may have ended with the window), the rest failed.
    assert 5 * (servicer.calls - 1) <= len(ok) <= 5 * servicer.calls


def test_a_stream_point_counts_signatures_by_item_code(certs: Any) -> None:
    from bench._loadgen import Point, Target, _H2Runner

    servicer = _StreamServicer(bad_every=2)
    runner = _H2Runner(channels=2)
    with _stream_server(certs, servicer) as port:
        cert, key = certs.files["admin"]
        target = Target(f"127.0.0.1:{port}", certs.ca_file, cert, key)
        request = pb.SignRequest(key_id="k", message=b"x").SerializeToString()
        try:
            res = runner.run(Point(target, "stream", request, 1, 2, time.monotonic(), 0.1, 0.3,
                                   depth=8))
        finally:
            runner.close()
    assert res.items > 0 and res.errors > 0 and abs(res.items - res.errors) <= 2 * 8
    assert len(res.latencies) == res.items + res.errors
    assert res.first_error == "a stream answer with code 5"
