"""A lean gRPC load generator: unary and bidirectional-streaming calls over raw
HTTP/2 on TLS sockets.

The grpcio client costs about 0.4 ms of CPU per call on this machine, as much
as a Python gRPC server: with it, the load generator takes up to half of the
two CPUs that the daemon needs. This one speaks just enough HTTP/2 (RFC 9113)
to send unary gRPC requests and wait for their ends, from one thread and one
selector per process, for a few tens of microseconds per call:

* requests are built once: an HPACK header block of literal fields (no
  Huffman, no dynamic table), then the length-prefixed message in DATA frames
  cut to the server's frame size and flow-control windows;
* answers are never HPACK-decoded: header blocks are skipped, which keeps no
  decoder state. A call succeeds when its stream brings a response message
  and ends; gRPC answers every error in Trailers-Only form, without a
  message, and a reset stream is an error too. For SignBatch the message is
  parsed to count the items that were signed;
* SETTINGS and PING are acknowledged, WINDOW_UPDATE is honoured, and the
  receive windows are opened wide (and topped up), so nothing stalls;
* streaming (:func:`run_streaming`): each caller keeps one stream open and
  up to ``depth`` request messages outstanding on it; answers come back in
  request order (signerd's SignStream promises it), one or more per response
  message (``codes`` says how many, and their status codes), so the send
  time of the oldest outstanding request is the one an answer belongs to.

The harness still checks one real answer per point with grpcio and verifies
the signature (bench/run.py: check_answer), so this client cannot make a
wrong answer count.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
MAX_WINDOW = 2**31 - 1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127  # one-byte lengths
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def header_block(path: str, authority: str) -> bytes:
    return b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "https"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")))


@dataclass
class _Stream:
    started: float
    unsent: memoryview  # DATA not yet allowed out by flow control
    window: int
    done: Callable[[_Stream], None]
    message: bytearray = field(default_factory=bytearray)
    reset: bool = False
    # False while a streaming call may still send: END_STREAM waits for it.
    half_close: bool = True
    end_sent: bool = False
    # Streaming calls: called with each complete response message as it
    # arrives (unary calls collect theirs in ``message``).
    on_message: Callable[[bytes], None] | None = None
    sid: int = 0


class Connection:
    """One TLS connection with ALPN h2, carrying many streams."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext) -> None:
        raw = socket.create_connection((host, port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=server_name)
        if self.sock.selected_alpn_protocol() != "h2":
            raise ConnectionError("the server did not agree to HTTP/2 (ALPN h2)")
        self.sock.settimeout(None)
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.send_window = 65535  # the connection's, as the server allows
        self.initial_window = 65535  # each new stream's, from the server's SETTINGS
        self.max_frame = 16384
        self.received = 0  # DATA bytes since the last connection WINDOW_UPDATE
        self.buffer = bytearray()
        self.outbox: list[bytes] = []  # frames to send with the next flush
        self.sock.sendall(PREFACE
                          + frame(SETTINGS, 0, 0, struct.pack(">HIHI", 0x2, 0,  # no push
                                                              INITIAL_WINDOW_SIZE, MAX_WINDOW))
                          + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535)))

    def close(self) -> None:
        try:
            self.sock.sendall(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
        except OSError:
            pass
        self.sock.close()

    def start(self, block: bytes, message: bytes, done: Callable[[_Stream], None]) -> None:
        """Open a stream for one request (``message`` is already length-prefixed);
        it leaves with the next :meth:`flush`."""
        sid, self.next_id = self.next_id, self.next_id + 2
        stream = _Stream(time.monotonic(), memoryview(message), self.initial_window, done, sid=sid)
        self.streams[sid] = stream
        self.outbox += (frame(HEADERS, END_HEADERS, sid, block), self._data(sid, stream))

    def open(self, block: bytes, on_message: Callable[[bytes], None],
             done: Callable[[_Stream], None]) -> _Stream:
        """Open a streaming call: HEADERS only; messages follow with
        :meth:`send` and END_STREAM with :meth:`half_close`."""
        sid, self.next_id = self.next_id, self.next_id + 2
        stream = _Stream(time.monotonic(), memoryview(b""), self.initial_window, done,
                         half_close=False, on_message=on_message, sid=sid)
        self.streams[sid] = stream
        self.outbox.append(frame(HEADERS, END_HEADERS, sid, block))
        return stream

    def send(self, stream: _Stream, message: bytes) -> None:
        """Queue one more (length-prefixed) message on an open stream."""
        stream.unsent = (memoryview(bytes(stream.unsent) + message) if stream.unsent
                         else memoryview(message))
        self.outbox.append(self._data(stream.sid, stream))

    def half_close(self, stream: _Stream) -> None:
        """End the request side of a streaming call (after what is queued)."""
        stream.half_close = True
        self.outbox.append(self._data(stream.sid, stream))

    def flush(self) -> None:
        """Send everything queued in one write: requests started while reading
        one batch of answers share a TLS record and a system call."""
        if self.outbox:
            out, self.outbox = b"".join(self.outbox), []
            self.sock.sendall(out)

    def _data(self, sid: int, s: _Stream) -> bytes:
        """As much of the stream's DATA as the windows allow, in frames."""
        out = []
        while s.unsent and self.send_window > 0 and s.window > 0:
            n = min(len(s.unsent), self.max_frame, self.send_window, s.window)
            chunk, s.unsent = s.unsent[:n], s.unsent[n:]
            last = not s.unsent and s.half_close
            out.append(frame(DATA, END_STREAM if last else 0, sid, bytes(chunk)))
            s.end_sent = s.end_sent or last
            self.send_window -= n
            s.window -= n
        if s.half_close and not s.unsent and not s.end_sent:  # a streaming call's end
            out.append(frame(DATA, END_STREAM, sid))
            s.end_sent = True
        return b"".join(out)

    def _send_unsent(self) -> None:
        self.outbox += (self._data(sid, s) for sid, s in self.streams.items()
                        if s.unsent or (s.half_close and not s.end_sent))

    def read(self) -> None:
        """Read what has arrived and act on every complete frame."""
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk
        while self.sock.pending():  # TLS may hold decrypted bytes select() cannot see
            self.buffer += self.sock.recv(self.sock.pending())
        buf, pos = self.buffer, 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos - 9 < length:
                break
            kind, flags, sid = struct.unpack_from(">BBI", buf, pos + 3)
            sid &= MAX_WINDOW
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._on_frame(kind, flags, sid, payload)
        del buf[:pos]
        if self.received > 1 << 30:
            self.outbox.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        self.flush()

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        """Handle one frame; answers go to the outbox."""
        if kind == DATA:
            self.received += len(payload)
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            stream = self.streams.get(sid)
            if stream is not None:
                stream.message += payload
                if stream.on_message is not None:
                    _deliver(stream, stream.on_message)
            if flags & END_STREAM:
                self._end(sid)
        elif kind == HEADERS:  # the header block itself is skipped, not decoded
            if flags & END_STREAM:
                self._end(sid)
        elif kind == RST_STREAM:
            if sid in self.streams:
                self.streams[sid].reset = True
            self._end(sid)
        elif kind == SETTINGS and not flags & ACK:
            for pos in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, pos)
                if key == INITIAL_WINDOW_SIZE:
                    for s in self.streams.values():
                        s.window += value - self.initial_window
                    self.initial_window = value
                elif key == MAX_FRAME_SIZE:
                    self.max_frame = value
            self._send_unsent()
            self.outbox.append(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.outbox.append(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload)[0] & MAX_WINDOW
            if sid == 0:
                self.send_window += increment
            elif sid in self.streams:
                self.streams[sid].window += increment
            self._send_unsent()
        elif kind == GOAWAY:
            raise ConnectionError(f"the server sent GOAWAY: {payload[8:].decode(errors='replace')}")

    def _end(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.done(stream)


def _deliver(stream: _Stream, on_message: Callable[[bytes], None]) -> None:
    """Hand every complete length-prefixed message in ``stream.message`` to
    ``on_message`` and keep the rest (a message may span DATA frames)."""
    m, pos = stream.message, 0
    while len(m) - pos >= 5:
        size = struct.unpack_from(">I", m, pos + 1)[0]
        if len(m) - pos - 5 < size:
            break
        if m[pos] != 0:  # compressed: never asked for (no grpc-accept-encoding sent)
            raise ConnectionError("the server sent a compressed message")
        body = bytes(m[pos + 5:pos + 5 + size])
        pos += 5 + size
        on_message(body)
    del m[:pos]


def context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def message(request: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(request)) + request


def response_body(stream: _Stream) -> bytes | None:
    """The response message of a finished stream; None if the call failed."""
    m = stream.message
    if stream.reset or len(m) < 5 or m[0] != 0:
        return None
    return bytes(m[5:5 + struct.unpack_from(">I", m, 1)[0]])


def _drive(conns: list[Connection], callers: int,
           start: Callable[[Connection, Callable[[], None]], object]) -> None:
    """Run ``callers`` callers over ``conns`` from one selector: caller i is
    started with ``start(conns[i mod n], finished)`` and calls ``finished()``
    when it is done; returns when every caller has. Raises TimeoutError when
    no answer arrives for 60 s."""
    selector = selectors.DefaultSelector()
    for c in conns:
        selector.register(c.sock, selectors.EVENT_READ, c)
    active = callers

    def finished() -> None:
        nonlocal active
        active -= 1

    try:
        for i in range(callers):
            start(conns[i % len(conns)], finished)
        for c in conns:
            c.flush()
        while active:
            events = selector.select(timeout=60)
            if not events:
                raise TimeoutError("no answer from the server for 60 s")
            for key, _ in events:
                conn: Any = key.data
                conn.read()
    finally:
        selector.close()


def run_closed_loop(conns: list[Connection], callers: int, block: bytes, request: bytes,
                    end: float, on_answer: Callable[[float, float, bytes | None], None]) -> None:
    """``callers`` closed-loop callers over ``conns`` (caller i on connection i mod n):
    each sends, waits for its answer, and sends again until ``end`` (monotonic).
    ``on_answer(started, finished, body_or_None)`` sees every call."""
    body = message(request)

    def start(conn: Connection, finished: Callable[[], None]) -> None:
        def done(stream: _Stream) -> None:
            now = time.monotonic()
            on_answer(stream.started, now, response_body(stream))
            if now < end:
                conn.start(block, body, done)
            else:
                finished()
        conn.start(block, body, done)

    _drive(conns, callers, start)


def run_closed_loop_varying(conns: list[Connection], callers: int, block: bytes,
                            next_request: Callable[[int], bytes], end: float,
                            on_answer: Callable[[float, float, bytes | None], None]) -> None:
    """As :func:`run_closed_loop`, but each request is built as it is sent:
    caller i sends ``next_request(i)`` (a serialised message), so that a caller
    can send rising versions of one document. The build is not in the latency:
    a call's clock starts when its stream opens."""
    callers_started = iter(range(callers))

    def start(conn: Connection, finished: Callable[[], None]) -> None:
        i = next(callers_started)

        def done(stream: _Stream) -> None:
            now = time.monotonic()
            on_answer(stream.started, now, response_body(stream))
            if now < end:
                conn.start(block, message(next_request(i)), done)
            else:
                finished()
        conn.start(block, message(next_request(i)), done)

    _drive(conns, callers, start)


class _StreamCaller:
    """One caller of :func:`run_streaming`: one open stream on ``conn``, up to
    ``depth`` requests outstanding, a new one sent as each answer arrives."""

    def __init__(self, conn: Connection, block: bytes, body: bytes, depth: int, end: float,
                 codes: Callable[[bytes], list[int]],
                 on_answer: Callable[[float, float, int | None], None],
                 finished: Callable[[], None]) -> None:
        self.conn, self.block, self.body, self.depth, self.end = conn, block, body, depth, end
        self.codes, self.on_answer, self.finished = codes, on_answer, finished
        self.sent: deque[float] = deque()  # send times of the outstanding requests, in order
        self.stream = self._open()

    def _open(self) -> _Stream:
        stream = self.conn.open(self.block, self._answer, self._ended)
        now = time.monotonic()
        for _ in range(self.depth):
            self.sent.append(now)
            self.conn.send(stream, self.body)
        return stream

    def _answer(self, answer: bytes) -> None:
        now = time.monotonic()
        for code in self.codes(answer):
            if not self.sent:
                raise ConnectionError("the server answered more requests than it was sent")
            self.on_answer(self.sent.popleft(), now, code)
            if now < self.end:
                self.sent.append(now)
                self.conn.send(self.stream, self.body)
        if now >= self.end and not self.sent:
            self.conn.half_close(self.stream)

    def _ended(self, stream: _Stream) -> None:
        """The stream ended (trailers or a reset): requests still outstanding
        failed; before ``end``, open a new stream, as a unary caller would
        send its next call."""
        now = time.monotonic()
        while self.sent:
            self.on_answer(self.sent.popleft(), now, None)
        if now < self.end:
            self.stream = self._open()
        else:
            self.finished()


def run_streaming(conns: list[Connection], callers: int, block: bytes, request: bytes,
                  depth: int, end: float, codes: Callable[[bytes], list[int]],
                  on_answer: Callable[[float, float, int | None], None]) -> None:
    """``callers`` callers over ``conns`` (caller i on connection i mod n), each
    keeping ONE bidirectional stream open and ``depth`` requests outstanding on
    it until ``end`` (monotonic); then each waits for its answers and half-closes.
    ``codes(message)`` gives the status codes of the answers one response
    message carries; ``on_answer(sent, answered, code_or_None)`` sees every
    request: None when its stream ended before answering it."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    body = message(request)
    _drive(conns, callers, lambda conn, finished: _StreamCaller(
        conn, block, body, depth, end, codes, on_answer, finished))
