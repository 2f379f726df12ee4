"""SignStream: one call, requests sent as they come, one answer per request in
order; each request authorized and audited on its own. Both engines."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from signerd import signing
from signerd.client import Client, ClientConfig
from signerd.keys import parse_algorithm
from signerd.server import v1
from signerd.server._readahead import ReadAhead
from signerd.v1 import signer_pb2 as pb
from tests.conftest import (
    ADMIN,
    RUNNER,
    Daemon,
    anonymous_client_cert,
    rpc_error,
    unique_gun,
)

ENGINES = ("aio", "threads")
SIGN_STREAM = "/signerd.v1.SignerService/SignStream"

# The runner may read every key but sign only targets/releases keys.
POLICY = f"""
[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["*"]

[[rule]]
name = "runner-reads"
identities = ["{RUNNER}"]
operations = ["read"]

[[rule]]
name = "runner-signs"
identities = ["{RUNNER}"]
operations = ["sign"]
roles = ["targets/releases"]
"""


def codes(items: list[pb.SignBatchItem]) -> list[str]:
    return [grpc.StatusCode(next(s for s in grpc.StatusCode if s.value[0] == i.code)).name
            for i in items]


def raw_requests(key_id: str, n: int) -> list[bytes]:
    """``n`` encoded SignRequests for ``key_id``, messages b"m0", b"m1", ..."""
    return [pb.SignRequest(key_id=key_id, message=b"m%d" % i).SerializeToString()
            for i in range(n)]


def held_open(key_id: str, release: threading.Event) -> Iterator[pb.SignRequest]:
    """A stream's requests: one, then none until ``release`` is set (at most
    30 s): the stream stays open and idle."""
    yield pb.SignRequest(key_id=key_id, message=b"first")
    release.wait(30)


def sign_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (daemon.workdir / "audit.log").read_text().splitlines()]
    return [x for x in lines if x.get("operation") == "sign"]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_request_is_answered_in_order_with_its_own_status(daemon_factory: Any,
                                                               engine: str) -> None:
    d: Daemon = daemon_factory(server={"engine": engine}, policy=POLICY)
    with d.client() as admin:
        p256 = admin.create_key(unique_gun(), "targets/releases", purpose="raw")
        rsa = admin.create_key(unique_gun(), "targets/releases", "rsa-2048", purpose="raw")
        targets = admin.create_key(unique_gun(), "targets", purpose="raw")
    reqs = [
        pb.SignRequest(key_id=p256.key_id, message=b"one"),
        pb.SignRequest(key_id="ab" * 32, message=b"unknown key"),
        pb.SignRequest(key_id=targets.key_id, message=b"not the runner's role"),
        pb.SignRequest(key_id=rsa.key_id, message=b"two"),  # RSA: off the loop in aio
        pb.SignRequest(key_id=p256.key_id, digest=b"short"),
        pb.SignRequest(key_id="not hex", message=b"x"),
        pb.SignRequest(key_id=p256.key_id, message=b"three", encoding=pb.SIGNATURE_ENCODING_DER),
    ]
    before = len(sign_lines(d))
    with d.client("runner") as runner:
        items = list(runner.sign_stream(reqs, timeout=30))
    assert codes(items) == ["OK", "NOT_FOUND", "PERMISSION_DENIED", "OK", "INVALID_ARGUMENT",
                            "INVALID_ARGUMENT", "OK"]
    assert "digest is 5 bytes" in items[4].error
    options = signing.SignOptions()
    signing.verify(p256.public_key_der, parse_algorithm("ecdsa-p256"),
                   items[0].response.signature, b"one", options)
    signing.verify(rsa.public_key_der, parse_algorithm("rsa-2048"),
                   items[3].response.signature, b"two", options)
    signing.verify(p256.public_key_der, parse_algorithm("ecdsa-p256"),
                   items[6].response.signature, b"three",
                   signing.SignOptions(signing.Encoding.DER))
    # One audit line per request, in order, with its own payload hash and outcome.
    lines = sign_lines(d)[before:]
    assert [x["status"] for x in lines] == codes(items)
    assert [x["payload_sha256"] for x in lines] == [
        hashlib.sha256(r.message or r.digest).hexdigest() for r in reqs]
    assert lines[2]["decision"] == "deny" and lines[2]["key_id"] == targets.key_id
    assert {x["identity"] for x in lines} == {f"uri:{RUNNER}"}


@pytest.mark.parametrize("engine", ENGINES)
def test_requests_sent_as_they_come_are_all_answered(daemon_factory: Any, engine: str) -> None:
    """A client that keeps many requests outstanding on one stream gets every
    answer, in order."""
    d: Daemon = daemon_factory(server={"engine": engine})
    with d.client() as c:
        keys = [c.create_key(unique_gun(), "targets", alg, purpose="raw")
                for alg in ("ecdsa-p256", "ed25519")]
        n = 600
        sent: list[pb.SignRequest] = []

        def requests() -> Iterator[pb.SignRequest]:
            for i in range(n):
                req = pb.SignRequest(key_id=keys[i % 2].key_id, message=b"m%d" % i)
                sent.append(req)
                yield req

        items = list(c.sign_stream(requests(), timeout=60))
    assert len(items) == n and set(codes(items)) == {"OK"}
    for i in (0, 1, n // 2, n - 1):
        key = keys[i % 2]
        assert items[i].response.key_id == key.key_id
        signing.verify(key.public_key_der, parse_algorithm(key.algorithm),
                       items[i].response.signature, sent[i].message, signing.SignOptions())


def test_requests_that_arrive_together_share_a_response(daemon_factory: Any) -> None:
    """The threads engine reads the stream while it signs, and answers the
    requests that arrived meanwhile with one response (one send, one audit
    write): 300 requests written at once come back in fewer responses, every
    item in order, each with its own audit line."""
    d: Daemon = daemon_factory(server={"engine": "threads"})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        n = 300
        reqs = raw_requests(key.key_id, n)
        before = len(sign_lines(d))
        call = c.channel.stream_stream(SIGN_STREAM)
        responses = [pb.SignStreamResponse.FromString(raw)
                     for raw in call(iter(reqs), timeout=60)]
    sizes = [len(r.items) for r in responses]
    assert sum(sizes) == n and len(sizes) < n and max(sizes) <= v1.ROUND_ITEMS
    items = [i for r in responses for i in r.items]
    for i in (0, 1, n // 2, n - 1):
        signing.verify(key.public_key_der, parse_algorithm("ecdsa-p256"),
                       items[i].response.signature, b"m%d" % i, signing.SignOptions())
    lines = sign_lines(d)[before:]
    assert [x["payload_sha256"] for x in lines] == [
        hashlib.sha256(b"m%d" % i).hexdigest() for i in range(n)]


def test_read_ahead_holds_at_most_its_limit_and_stops_its_reader() -> None:
    """Nobody takes rounds: the reader takes ``limit`` requests and one more
    (blocked on the full queue), no further; leaving the context ends it."""
    taken = 0

    def endless() -> Iterator[int]:
        nonlocal taken
        while True:
            taken += 1
            yield taken

    ahead = ReadAhead(endless(), limit=4, max_bytes=1000, size=lambda _: 1)
    with ahead as rounds:
        deadline = time.monotonic() + 10
        while taken < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert taken == 5
        assert next(rounds) == [1, 2, 3, 4]  # a full round stops at the limit
    ahead._thread.join(timeout=10)
    assert not ahead._thread.is_alive()


def test_read_ahead_hands_over_every_request_then_the_stream_error() -> None:
    gate = threading.Event()

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        gate.wait(10)
        yield 3
        raise grpc.RpcError("cancelled")

    with ReadAhead(failing(), limit=8, max_bytes=1000, size=lambda _: 1) as rounds:
        got = next(rounds)
        while len(got) < 2:
            got += next(rounds)
        gate.set()
        assert got == [1, 2]
        with pytest.raises(grpc.RpcError, match="cancelled"):
            for r in rounds:
                got += r
    assert got == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 1"):
        ReadAhead(iter([1]), limit=0, max_bytes=1, size=lambda _: 1)


def test_read_ahead_cuts_rounds_and_its_queue_by_bytes() -> None:
    """Requests of 400 bytes, 1,000 bytes at most: two per round, and the
    reader stops taking once 1,000 bytes wait; a request larger than the
    limit is still taken, alone."""
    sizes = [400] * 5 + [5000, 400]
    taken = 0

    def requests() -> Iterator[int]:
        nonlocal taken
        for n in sizes:
            taken += 1
            yield n

    with ReadAhead(requests(), limit=100, max_bytes=1000, size=lambda n: n) as rounds:
        deadline = time.monotonic() + 10
        while taken < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert taken == 4  # three queued (1,200 bytes), the fourth waits for room
        got = list(rounds)
    assert got[0] == [400, 400]  # what was queued, cut at 1,000 bytes
    assert [n for r in got for n in r] == sizes
    assert all(sum(r) <= 1000 or len(r) == 1 for r in got) and [5000] in got


@pytest.mark.parametrize("engine", ENGINES)
def test_an_undecodable_request_fails_alone(daemon_factory: Any, engine: str) -> None:
    d: Daemon = daemon_factory(server={"engine": engine})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        good = pb.SignRequest(key_id=key.key_id, message=b"ok").SerializeToString()
        call = c.channel.stream_stream(SIGN_STREAM)
        answers = [item for raw in call(iter([good, b"\x0a\x02\xff\xfe", good]), timeout=30)
                   for item in pb.SignStreamResponse.FromString(raw).items]
    assert codes(answers) == ["OK", "INVALID_ARGUMENT", "OK"]
    assert answers[1].error == "the request is not a valid SignRequest message"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unidentified_caller_is_refused_and_audited(daemon_factory: Any, certs: Any,
                                                       tmp_path: Path, engine: str) -> None:
    d: Daemon = daemon_factory(server={"engine": engine})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
    cert, private = anonymous_client_cert(certs, tmp_path)
    with Client(ClientConfig(f"127.0.0.1:{d.port}", certs.ca_file, cert, private, "localhost",
                             20)) as anon:
        err = rpc_error(lambda: list(anon.sign_stream(
            [pb.SignRequest(key_id=key.key_id, message=b"x")], timeout=30)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    [line] = [x for x in sign_lines(d) if x["status"] == "UNAUTHENTICATED"]
    assert line["decision"] == "deny" and line["identity"] == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stream_ends_cleanly_when_the_client_goes_away(daemon_factory: Any,
                                                         engine: str) -> None:
    """A client that cancels mid-stream leaves the daemon serving, and gives
    its identity's slot back: with threads = 4 (limit 2), five cancelled
    streams in a row are each served."""
    d: Daemon = daemon_factory(server={"engine": engine, "threads": 4})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        for _ in range(5):
            stop = threading.Event()

            def forever(stop: threading.Event = stop) -> Iterator[pb.SignRequest]:
                while not stop.is_set():
                    yield pb.SignRequest(key_id=key.key_id, message=b"x")

            call = c.stub.SignStream(forever(), timeout=30)
            answered = 0
            for response in call:
                answered += len(response.items)
                if answered >= 50:
                    call.cancel()
                    break
            stop.set()
            assert answered >= 50
        assert c.sign(key.key_id, b"after").signature


def test_the_aio_engine_serves_every_kind_of_method(daemon_factory: Any) -> None:
    """The aio engine wraps each kind of handler itself (unary inline and on
    the executor, health's sync Watch stream, reflection's async stream,
    the Notary-compatible service): each answers, and a caller's mistake
    keeps its status code."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    d: Daemon = daemon_factory(server={"engine": "aio"})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")  # on the executor
        assert c.sign(key.key_id, b"m").signature  # inline
        assert rpc_error(lambda: c.sign("ab" * 32, b"m")).code() == grpc.StatusCode.NOT_FOUND
        bad = rpc_error(lambda: c.channel.unary_unary("/signerd.v1.SignerService/Sign")(
            b"\x0a\x02\xff\xfe", timeout=10))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        notary = npb_grpc.SignerStub(c.channel).Sign(
            npb.SignatureRequest(keyID=npb.KeyID(ID=key.key_id), content=b"m"), timeout=10)
        assert notary.content
        health = health_pb2_grpc.HealthStub(c.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        answers = list(reflection_pb2_grpc.ServerReflectionStub(c.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"signerd.v1.SignerService", "proto.Signer", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("engine", ENGINES)
def test_an_idle_stream_holds_no_work_slot(daemon_factory: Any, engine: str) -> None:
    """A stream counts against the server's stream bound for its whole life
    (test_streams_of_all_identities_hold_at_most_half_the_threads), but holds
    a work slot only while one of its requests is signed: with a limit of 2
    (it was refused RESOURCE_EXHAUSTED at once before), two idle streams of
    one identity leave it its Sign, its third stream and another identity's
    signatures."""
    d: Daemon = daemon_factory(server={"engine": engine, "threads": 8,
                                       "max_inflight_per_identity": 2}, policy=POLICY)
    with d.client() as admin, d.client("runner") as runner:
        key = admin.create_key(unique_gun(), "targets/releases", purpose="raw")
        release = threading.Event()
        held = functools.partial(held_open, key.key_id, release)
        streams = [admin.stub.SignStream(held(), timeout=30) for _ in range(2)]
        try:
            for call in streams:  # each handler is running: its first answer is back
                assert next(call).items[0].code == 0
            start = time.monotonic()
            assert admin.sign(key.key_id, b"unary").signature
            assert runner.sign(key.key_id, b"another identity").signature
            third = list(admin.sign_stream([pb.SignRequest(key_id=key.key_id, message=b"3")],
                                           timeout=30))
            assert codes(third) == ["OK"]
            assert time.monotonic() - start < 5
        finally:
            release.set()
            for call in streams:
                assert [i.code for r in call for i in r.items] == []
    assert "RESOURCE_EXHAUSTED" not in {x["status"] for x in sign_lines(d)}


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_items_and_refused_streams_are_counted(daemon_factory: Any, certs: Any,
                                                      tmp_path: Path, engine: str) -> None:
    """signerd_requests_total counts each SignStream item by its own code,
    and a stream refused as a whole by the call's code."""
    from tests.test_metrics import delta, scrape
    d: Daemon = daemon_factory(server={"engine": engine}, metrics=True)
    assert d.servers.http is not None
    port = d.servers.http.port
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        before = scrape(port)
        items = list(c.sign_stream([pb.SignRequest(key_id=key.key_id, message=b"a"),
                                    pb.SignRequest(key_id="ab" * 32, message=b"b"),
                                    pb.SignRequest(key_id=key.key_id, message=b"c")],
                                   timeout=30))
        assert codes(items) == ["OK", "NOT_FOUND", "OK"]
    cert, private = anonymous_client_cert(certs, tmp_path)
    with Client(ClientConfig(f"127.0.0.1:{d.port}", certs.ca_file, cert, private, "localhost",
                             20)) as anon:
        err = rpc_error(lambda: list(anon.sign_stream(
            [pb.SignRequest(key_id=key.key_id, message=b"x")], timeout=30)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    after = scrape(port)
    count = {code: delta(before, after, "signerd_requests_total",
                         service="signerd.v1.SignerService", method="SignStream", code=code)
             for code in ("OK", "NOT_FOUND", "UNAUTHENTICATED")}
    assert count == {"OK": 2, "NOT_FOUND": 1, "UNAUTHENTICATED": 1}
    assert delta(before, after, "signerd_request_duration_seconds_count",
                 method="SignStream") == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_streams_of_all_identities_hold_at_most_half_the_threads(daemon_factory: Any,
                                                                 engine: str) -> None:
    """threads = 4: two idle streams, one each of two identities, are all the
    streams the server holds; a third (of either) is refused at once, while
    unary calls of both are still answered."""
    d: Daemon = daemon_factory(server={"engine": engine, "threads": 4}, policy=POLICY)
    with d.client() as admin, d.client("runner") as runner:
        key = admin.create_key(unique_gun(), "targets/releases", purpose="raw")
        release = threading.Event()
        held = functools.partial(held_open, key.key_id, release)
        streams = [c.stub.SignStream(held(), timeout=30) for c in (admin, runner)]
        try:
            for call in streams:
                assert next(call).items[0].code == 0
            err = rpc_error(lambda: list(runner.stub.SignStream(held(), timeout=30)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "streams open" in err.details()
            for c in (admin, runner):
                start = time.monotonic()
                assert c.sign(key.key_id, b"unary").signature
                assert time.monotonic() - start < 5
        finally:
            release.set()
            for call in streams:
                list(call)
        assert len(list(runner.sign_stream([pb.SignRequest(key_id=key.key_id,
                                                           message=b"again")]))) == 1


def test_a_cancelled_stream_stops_signing_its_round(daemon_factory: Any) -> None:
    """Threads engine: a client that cancels while a round of slow (RSA-4096)
    requests is being signed gets nothing more signed for it: the round stops
    at the next request, and no signature is made that nobody receives."""
    d: Daemon = daemon_factory(server={"engine": "threads"})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", "rsa-4096", purpose="raw")
        before = len(sign_lines(d))
        reqs = raw_requests(key.key_id, 300)
        call = c.channel.stream_stream(SIGN_STREAM)(iter(reqs), timeout=60)
        answered = len(pb.SignStreamResponse.FromString(next(call)).items)
        call.cancel()
        time.sleep(2)  # a round of 128 RSA-4096 signatures takes longer than this
        signed = len(sign_lines(d)) - before
        time.sleep(1)
    assert len(sign_lines(d)) - before == signed  # nothing more after the cancel
    assert signed <= answered + 3, (signed, answered)


def test_stopping_waits_for_streams_before_closing_tokens_and_audit(
        daemon_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Threads engine: streams signing RSA-4096 rounds when the daemon stops
    end before the tokens and the audit log close: no signature is made that
    no audit line records."""
    d: Daemon = daemon_factory(server={"engine": "threads"})
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", "rsa-4096", purpose="raw")
        reqs = raw_requests(key.key_id, 300)
        calls = [c.channel.stream_stream(SIGN_STREAM)(iter(reqs), timeout=60)
                 for _ in range(3)]
        for call in calls:
            next(call)
        with caplog.at_level(logging.WARNING):
            d.servers.stop(grace=0.5)
        for call in calls:
            call.cancel()
    failed = [r.getMessage() for r in caplog.records
              if "audit" in r.getMessage() or "still running" in r.getMessage()]
    assert failed == []


def test_a_request_iterator_that_raises_gets_its_own_exception_back(daemon: Daemon) -> None:
    """Regression (second trial): Client.sign_stream with a generator that
    raised ended in gRPC's UNKNOWN "Exception iterating requests!", and the
    caller's exception was lost. The requests before it are answered."""
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")

        def requests() -> Iterator[pb.SignRequest]:
            yield pb.SignRequest(key_id=key.key_id, message=b"a")
            yield pb.SignRequest(key_id=key.key_id, message=b"b")
            raise LookupError("the caller's own failure")

        got: list[pb.SignBatchItem] = []
        with pytest.raises(LookupError, match="the caller's own failure"):
            for item in c.sign_stream(requests(), timeout=30):
                got.append(item)
    assert codes(got) == ["OK", "OK"]
