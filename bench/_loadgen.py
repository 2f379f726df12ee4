"""The load generator: one of several processes that call signerd.

Each process is started once (multiprocessing 'spawn') and serves many
measurement points, so TLS connections are set up before the clock starts.
It runs ``callers`` closed-loop callers: each sends one request, waits for
the answer, and sends the next. Three ways to run them:

``h2``       (default) raw HTTP/2 on TLS sockets, one thread and a selector
             (bench/_h2load.py): about 0.17 ms of CPU per call here, against
             about 0.4 ms for grpcio's client, so the daemon keeps the CPU;
``aio``      one grpc.aio event loop with a coroutine per caller;
``threads``  a thread per caller, blocking grpcio calls.

The "stream" RPC (signerd.v1 SignStream, bidirectional) is not closed-loop
per call: each caller keeps one stream open for the whole window with up to
``depth`` requests outstanding, sending the next as each answer arrives
(bench/_h2load.py: run_streaming; h2 mode only). It counts a signature per
item (of a SignStreamResponse) whose code is 0; a request's latency runs from its send
to its answer.

Requests are serialised once and answers are left unparsed (raw bytes) on
the hot path: the load generator should spend its CPU on gRPC, not on
protobuf. Correctness is checked once per point, outside the clock, by
parsing and verifying one answer in the harness.

Only calls that *finish* inside the measuring window count; latency is
measured per call with the monotonic clock (shared by all processes, so one
``start_at`` lines every process up).
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench import _h2load

SIGN = "/signerd.v1.SignerService/Sign"
SIGN_BATCH = "/signerd.v1.SignerService/SignBatch"
SIGN_STREAM = "/signerd.v1.SignerService/SignStream"
# Notary's signer API, as signerd and notary-signer serve it (notary's proto package is "proto").
NOTARY_SIGN = "/proto.Signer/Sign"
# "floor" is bench/_floor.py: the v1 Sign path on a server that does not sign.
PATHS = {"v1": SIGN, "notary": NOTARY_SIGN, "batch": SIGN_BATCH, "stream": SIGN_STREAM,
         "floor": SIGN}
STREAM_DEPTH = 32  # requests outstanding per stream, by default


@dataclass(frozen=True)
class Target:
    address: str
    ca: Path
    cert: Path
    key: Path
    server_name: str = "localhost"


@dataclass(frozen=True)
class Point:
    """One measurement: ``callers`` callers in this process sending ``request``."""

    target: Target
    rpc: str  # a key of PATHS: "v1", "notary", "batch", "stream" or "floor"
    request: bytes  # serialised request message
    items: int  # signatures per request (batch size, else 1)
    callers: int
    start_at: float  # time.monotonic() when calls begin
    warmup: float
    duration: float
    depth: int = STREAM_DEPTH  # "stream": requests outstanding per caller


def _options(index: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.ssl_target_name_override", "localhost"),
        # Without this, channels with equal arguments share one TCP
        # connection, and a multi-worker daemon would see a single client.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 64 << 20),
        ("bench.channel", index),
    ]


def _credentials(t: Target) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(t.ca.read_bytes(), t.key.read_bytes(), t.cert.read_bytes())


class _Result:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.items = 0
        self.errors = 0
        self.first_error = ""

    def to_dict(self) -> dict[str, Any]:
        return {"latencies": self.latencies.tobytes(), "items": self.items, "errors": self.errors,
                "first_error": self.first_error}


def _batch_items_ok(raw: bytes) -> int:
    from signerd.v1 import signer_pb2 as pb

    return sum(1 for item in pb.SignBatchResponse.FromString(raw).items if item.code == 0)


def _stream_codes(raw: bytes) -> list[int]:
    """The status codes of the answers one SignStream response carries."""
    from signerd.v1 import signer_pb2 as pb

    return [item.code for item in pb.SignStreamResponse.FromString(raw).items]


def _streaming_needs_h2(p: Point) -> None:
    if p.rpc == "stream":
        raise ValueError("the stream RPC is driven by the h2 load generator only")


class _AioRunner:
    def __init__(self, channels: int) -> None:
        self.max_channels = channels
        self.channels: dict[Target, list[grpc.aio.Channel]] = {}

    async def _channel(self, t: Target, i: int) -> grpc.aio.Channel:
        have = self.channels.setdefault(t, [])
        while len(have) <= i % self.max_channels:
            ch = grpc.aio.secure_channel(t.address, _credentials(t), options=_options(len(have)))
            await asyncio.wait_for(ch.channel_ready(), 30)
            have.append(ch)
        return have[i % self.max_channels]

    async def close(self) -> None:
        for have in self.channels.values():
            for ch in have:
                await ch.close()

    async def run(self, p: Point) -> _Result:
        _streaming_needs_h2(p)
        res = _Result()
        calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            (await self._channel(p.target, i)).unary_unary(PATHS[p.rpc])
            for i in range(p.callers)]
        measure_from = p.start_at + p.warmup
        end = measure_from + p.duration
        await asyncio.sleep(max(0.0, p.start_at - time.monotonic()))

        async def caller(call: Any) -> None:
            now = time.monotonic
            while True:
                t0 = now()
                if t0 >= end:
                    return
                try:
                    raw = await call(p.request)
                    ok = _batch_items_ok(raw) if p.rpc == "batch" else 1
                    bad = p.items - ok
                except grpc.RpcError as e:
                    ok, bad = 0, p.items
                    if not res.first_error:
                        res.first_error = f"{e.code().name}: {e.details()}"
                t1 = now()
                if measure_from <= t1 <= end:
                    res.items += ok
                    res.errors += bad
                    res.latencies.append(t1 - t0)

        await asyncio.gather(*(caller(c) for c in calls))
        return res


class _ThreadRunner:
    def __init__(self, channels: int) -> None:
        self.max_channels = channels
        self.channels: dict[Target, list[grpc.Channel]] = {}

    def _channel(self, t: Target, i: int) -> grpc.Channel:
        have = self.channels.setdefault(t, [])
        while len(have) <= i % self.max_channels:
            ch = grpc.secure_channel(t.address, _credentials(t), options=_options(len(have)))
            grpc.channel_ready_future(ch).result(timeout=30)
            have.append(ch)
        return have[i % self.max_channels]

    def run(self, p: Point) -> _Result:
        _streaming_needs_h2(p)
        res = _Result()
        lock = threading.Lock()
        calls: list[grpc.UnaryUnaryMultiCallable[bytes, bytes]] = [
            self._channel(p.target, i).unary_unary(PATHS[p.rpc]) for i in range(p.callers)]
        measure_from = p.start_at + p.warmup
        end = measure_from + p.duration

        def caller(call: Any) -> None:
            lat = array("d")
            items = errors = 0
            first = ""
            now = time.monotonic
            time.sleep(max(0.0, p.start_at - now()))
            while True:
                t0 = now()
                if t0 >= end:
                    break
                try:
                    raw = call(p.request)
                    ok = _batch_items_ok(raw) if p.rpc == "batch" else 1
                    bad = p.items - ok
                except grpc.RpcError as e:
                    ok, bad = 0, p.items
                    first = first or f"{e.code().name}: {e.details()}"
                t1 = now()
                if measure_from <= t1 <= end:
                    items += ok
                    errors += bad
                    lat.append(t1 - t0)
            with lock:
                res.latencies.extend(lat)
                res.items += items
                res.errors += errors
                res.first_error = res.first_error or first

        threads = [threading.Thread(target=caller, args=(c,)) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return res


class _H2Runner:
    """Callers on raw HTTP/2 connections (bench/_h2load.py), one thread."""

    def __init__(self, channels: int) -> None:
        self.max_channels = channels
        self.conns: dict[Target, list[_h2load.Connection]] = {}

    def _conns(self, t: Target, n: int) -> list[_h2load.Connection]:
        have = self.conns.setdefault(t, [])
        host, port = t.address.rsplit(":", 1)
        while len(have) < n:
            ctx = _h2load.context(str(t.ca), str(t.cert), str(t.key))
            have.append(_h2load.Connection(host, int(port), t.server_name, ctx))
        return have[:n]

    def close(self) -> None:
        for t in list(self.conns):
            self.hang_up(t)

    def hang_up(self, t: Target) -> None:
        """Close the connections to ``t``. Between runs nothing reads them,
        so a server that is stopping would wait its whole grace period for
        an answer to its GOAWAY (grpcio's clients answer it themselves)."""
        for c in self.conns.pop(t, []):
            c.close()

    def run(self, p: Point) -> _Result:
        res = _Result()
        conns = self._conns(p.target, min(p.callers, self.max_channels))
        measure_from = p.start_at + p.warmup
        end = measure_from + p.duration

        def on_answer(t0: float, t1: float, body: bytes | None) -> None:
            if body is None:
                ok, bad = 0, p.items
                res.first_error = res.first_error or (
                    "a call ended without an answer (an error status or a reset stream)")
            else:
                ok = _batch_items_ok(body) if p.rpc == "batch" else 1
                bad = p.items - ok
            count(t0, t1, ok, bad)

        def on_item(t0: float, t1: float, code: int | None) -> None:
            if code is None:
                res.first_error = res.first_error or "a stream ended before answering a request"
            elif code:
                res.first_error = res.first_error or f"a stream answer with code {code}"
            count(t0, t1, int(code == 0), int(code != 0))

        def count(t0: float, t1: float, ok: int, bad: int) -> None:
            if measure_from <= t1 <= end:
                res.items += ok
                res.errors += bad
                res.latencies.append(t1 - t0)

        block = _h2load.header_block(PATHS[p.rpc], p.target.server_name)
        time.sleep(max(0.0, p.start_at - time.monotonic()))
        if p.rpc == "stream":
            _h2load.run_streaming(conns, p.callers, block, p.request, p.depth, end,
                                  _stream_codes, on_item)
        else:
            _h2load.run_closed_loop(conns, p.callers, block, p.request, end, on_answer)
        return res


def main(conn: Connection, mode: str, channels: int) -> None:
    """Process body: answer ("run", Point) and ("hang_up", Target) commands
    until ("stop",).

    ``channels`` caps the connections per daemon address in this process;
    callers beyond it share them (HTTP/2 multiplexing)."""
    if mode == "aio":
        asyncio.run(_aio_main(conn, channels))
        return
    runner: _ThreadRunner | _H2Runner = (
        _H2Runner(channels) if mode == "h2" else _ThreadRunner(channels))
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            if isinstance(runner, _H2Runner):
                runner.close()
            return
        if cmd[0] == "hang_up":
            if isinstance(runner, _H2Runner):
                runner.hang_up(cmd[1])
            conn.send("done")
            continue
        conn.send(runner.run(cmd[1]).to_dict())


async def _aio_main(conn: Connection, channels: int) -> None:
    runner = _AioRunner(channels)
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "stop":
            await runner.close()
            return
        conn.send((await runner.run(cmd[1])).to_dict())
