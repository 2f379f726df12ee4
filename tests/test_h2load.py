"""bench/_h2load.py, the lean load generator, against a real daemon over mutual TLS.

It never decodes HPACK, so these check what it relies on: an answered call
brings the response message, an error (Trailers-Only) brings none, large
requests respect HTTP/2 flow control, and SETTINGS/PING from grpc's server
do not stall it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import _h2load
from signerd import signing
from signerd.keys import parse_algorithm
from signerd.v1 import signer_pb2 as pb
from tests.conftest import daemon_config, start_daemon, unique_gun

SIGN = "/signerd.v1.SignerService/Sign"


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
    key = daemon.client().create_key(unique_gun(), "targets")
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
    key = daemon.client().create_key(unique_gun(), "targets")
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
        key = d.client().create_key(unique_gun(), "targets")
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
