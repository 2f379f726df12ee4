"""``[server] engine = "aio"``: signerd's servicers on a grpc.aio server.

The servicers (signerd.server.v1 and .notary) are plain functions of a
request and a context. The threads engine runs each call on a thread of a
pool, so every request crosses from gRPC's polling thread to a handler
thread and back, and the two pass the GIL to each other on every call (the
profile in issue 15 put gRPC's machinery, most of it that hand-off, at half
of the daemon's Python time). Here one event loop (uvloop when installed)
runs the server, and:

* a Sign whose key signs fast (KeyService.signs_fast: a healthy software
  token with a session free, and an elliptic-curve key; about 70 µs) runs
  **inline on the loop thread**. If the token fails under such a call, that
  call's one reconnect runs on the loop too (SoftHSM: about 1.5 s) and
  stalls it; the token is then unhealthy, and its calls go to the executor
  until a probe finds it back;
* every other unary call (key generation, listings, RSA, a hardware token,
  anything that may wait on a device) runs on a small executor, so a slow
  token never stalls the loop;
* SignStream answers each request as it arrives, inline under the same
  rule as Sign (see :func:`sign_stream`);
* every call of signerd's own services waits for its work slot
  (signerd.server._fair.Admission) **on the loop**, before it is
  dispatched, so a queued call holds no thread and never blocks the loop
  (:func:`admit`).

Each call gets a :class:`CallContext`: the part of a sync ServicerContext the
servicers use, whose ``abort`` raises :class:`Aborted`, which the wrapper
turns into the aio context's ``abort``. Request bytes are decoded here, as
in the threads engine (signerd.server.app._Requests), so an undecodable
request is INVALID_ARGUMENT and audited, and costs nothing afterwards.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Mapping,
)
from concurrent import futures
from contextlib import AbstractContextManager
from typing import Any, NoReturn, TypeVar

import grpc

from signerd import metrics
from signerd.errors import InvalidArgument, SignerdError
from signerd.server._fair import Admission
from signerd.v1 import signer_pb2 as pb

log = logging.getLogger("signerd.server")
T = TypeVar("T")



class Aborted(Exception):
    """Raised by :meth:`CallContext.abort`: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The part of ``grpc.ServicerContext`` signerd's servicers use, over a
    ``grpc.aio.ServicerContext``, for calling them as plain functions (on
    the loop thread or on the executor)."""

    __slots__ = ("_ctx", "_code", "admission")

    def __init__(self, ctx: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._ctx = ctx
        self._code: grpc.StatusCode | None = None
        # True once :func:`admit` took the call's work slot, or the error
        # that refused it; read by the gate (signerd.server._gate.Gate.decide).
        self.admission: bool | SignerdError | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with ``code`` and ``details``: raises Aborted."""
        self._code = code
        raise Aborted(code, details)

    def peer(self) -> str:
        """The peer's address, as gRPC names it (``ipv4:127.0.0.1:50312``)."""
        return self._ctx.peer()

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        """The TLS auth context (``x509_pem_cert``...), as gRPC gives it."""
        return self._ctx.auth_context()

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline, None without one."""
        return self._ctx.time_remaining()

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Trailing metadata sent with the status."""
        self._ctx.set_trailing_metadata(metadata)

    def code(self) -> grpc.StatusCode | None:
        """The status this call was aborted with, None until then."""
        return self._code


class Loop:
    """An event loop on its own thread (uvloop's when installed), for the aio
    servers of one daemon process and everything that touches them."""

    def __init__(self) -> None:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            self.loop = asyncio.new_event_loop()
            self.kind = "asyncio"
        else:
            self.loop = uvloop.new_event_loop()
            self.kind = "uvloop"
        self._thread = threading.Thread(target=self._run, name="grpc-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def running(self) -> bool:
        """Whether the loop still runs (False once closed)."""
        return self._thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from another
        thread). Raises RuntimeError when the loop was closed."""
        if not self.running:
            coro.close()
            raise RuntimeError("the server's event loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Schedule ``coro`` on the loop without waiting for it (from any
        thread, the loop's own included); dropped once the loop is closed."""
        if not self.running:
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the loop thread and wait for its result."""
        async def call() -> T:
            return fn()
        return self.run(call())

    def close(self) -> None:
        """Stop the loop and its thread (after the servers stopped). Idempotent."""
        if self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


class Requests(grpc.aio.ServerInterceptor):
    """The aio engine's wrapper around every method: raw request bytes are
    decoded here; unary methods become coroutines that run the sync
    servicer inline (``inline(method, request)`` says when) or on
    ``executor``, once ``admit(context)`` took their work slot (given back
    with ``release``); SignStream gets its own driver (sign_stream); every
    unary call is counted and timed (signerd.metrics) as in the threads engine.

    Streaming methods other than SignStream keep their servicer's own
    driver, with the request bytes decoded first (_decoding_stream_handler)."""

    def __init__(self, reject: Callable[[Any, str, str], None],
                 executor: futures.ThreadPoolExecutor,
                 inline: Callable[[str, Any], bool],
                 sign_stream: Callable[[AsyncIterator[bytes], Any], AsyncIterator[Any]],
                 admit: Callable[[CallContext], Awaitable[Hashable | None]],
                 release: Callable[[Hashable], None],
                 ) -> None:
        self._reject = reject
        self._admit = admit
        self._release = release
        self._executor = executor
        self._inline = inline
        self._sign_stream = sign_stream
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = remember(self._wrapped, details,
                               self._wrap(await continuation(details), details))
        return wrapped

    def _wrap(self, handler: Any, details: Any) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        decode = decoder(handler, details.method, self._reject)
        serializer = handler.response_serializer

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(service, method, handler.unary_unary, decode),
                response_serializer=serializer)
        if handler.stream_stream is not None and details.method == SIGN_STREAM:
            sign_stream = self._sign_stream

            async def stream(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in sign_stream(raws, context):
                        yield item
                finally:
                    count_failed_call(service, method, context.code())

            return grpc.stream_stream_rpc_method_handler(stream, response_serializer=serializer)
        return _decoding_stream_handler(handler, decode, serializer)

    def _unary(self, service: str, method: str, inner: Callable[..., Any],
               decode: Callable[[bytes, Any], Any]) -> Callable[..., Any]:
        requests, latency = metrics.REQUESTS, metrics.LATENCY.labels(method)
        loop_executor, inline = self._executor, self._inline
        admit, release = self._admit, self._release
        is_async = inspect.iscoroutinefunction(inner)

        async def call(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            ctx = CallContext(context)
            code = grpc.StatusCode.UNKNOWN
            admitted: Hashable | None = None
            try:
                request = decode(raw, ctx)
                if is_async:  # not signerd's (health): no gate, no slot
                    result = await inner(request, context)
                elif (admitted := await admit(ctx)) is None and ctx.admission is not None:
                    result = inner(request, ctx)  # refused while waiting: the gate says so
                elif inline(method, request):
                    result = inner(request, ctx)
                else:
                    result = await asyncio.get_running_loop().run_in_executor(
                        loop_executor, inner, request, ctx)
                code = grpc.StatusCode.OK
                return result
            except Aborted as a:
                code = a.code
                await context.abort(a.code, a.details)
            finally:
                if admitted is not None:
                    release(admitted)
                latency.observe(time.perf_counter() - start)
                metrics.child(requests, service, method, code.name).inc()

        return call


SIGN_STREAM = "/signerd.v1.SignerService/SignStream"


def count_failed_call(service: str, method: str, code: grpc.StatusCode | None) -> None:
    """Count a streaming call that ended with a status other than OK (refused,
    or failed as a whole) in signerd_requests_total; its items are counted
    one by one where they are answered (SignerServicer.sign_items). Both
    engines."""
    if code is not None and code != grpc.StatusCode.OK:
        metrics.child(metrics.REQUESTS, service, method, code.name).inc()


def remember(cache: dict[str, Any], details: Any, wrapped: Any) -> Any:
    """Keep a method's wrapped handler in ``cache`` (by method path) and
    return it. gRPC asks the interceptors on every call, and a method's
    handler never changes, so its wrapper is made once; only methods that
    exist (a handler, not None) are kept."""
    if wrapped is not None:
        cache[details.method] = wrapped
    return wrapped


def decoder(handler: Any, path: str,
            reject: Callable[[Any, str, str], None]) -> Callable[[bytes, Any], Any]:
    """``decode(raw, context)`` for the method at ``path``: its request from
    the raw bytes, or ``reject(context, path, message)`` (which audits and
    aborts with INVALID_ARGUMENT) when they are not that message. Shared by
    both engines' interceptors (signerd.server.app._Requests and Requests)."""
    decode_one = handler.request_deserializer
    message = f"the request is not a valid {path.rpartition('/')[2]} message"

    def decode(raw: bytes, context: Any) -> Any:
        try:
            return decode_one(raw)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            reject(context, path, message)

    return decode


def _decoding_stream_handler(handler: Any, decode: Callable[[bytes, Any], Any],
                             serializer: Any) -> Any:
    """A streaming method with its request bytes decoded by ``decode``: the
    servicer is an async generator (reflection), a coroutine writing with
    context.write (grpc_health's aio Watch), or sync (grpc.aio then runs it
    on its migration pool with a sync context)."""
    if handler.unary_stream is not None:
        inner = handler.unary_stream
        if inspect.isasyncgenfunction(inner):
            async def unary_stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
                try:
                    request = decode(raw, CallContext(context))
                except Aborted as a:
                    await context.abort(a.code, a.details)
                async for item in inner(request, context):
                    yield item
            return grpc.unary_stream_rpc_method_handler(unary_stream,
                                                        response_serializer=serializer)
        if inspect.iscoroutinefunction(inner):  # writes with context.write (health's Watch)
            async def unary_stream_writer(raw: bytes, context: Any) -> None:
                try:
                    request = decode(raw, CallContext(context))
                except Aborted as a:
                    await context.abort(a.code, a.details)
                await inner(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream_writer,
                                                        response_serializer=serializer)
        return grpc.unary_stream_rpc_method_handler(
            lambda raw, context: inner(decode(raw, context), context),
            response_serializer=serializer)
    both = handler.stream_stream or handler.stream_unary
    if not (inspect.isasyncgenfunction(both) or inspect.iscoroutinefunction(both)):
        raise TypeError(f"signerd's aio engine has no sync driver for {both}")

    async def decoded(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
        ctx = CallContext(context)
        async for raw in raws:
            try:
                yield decode(raw, ctx)
            except Aborted as a:
                await context.abort(a.code, a.details)

    if handler.stream_stream is not None:
        async def stream_stream(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            async for item in both(decoded(raws, context), context):
                yield item
        return grpc.stream_stream_rpc_method_handler(stream_stream,
                                                     response_serializer=serializer)

    async def stream_unary(raws: AsyncIterator[bytes], context: Any) -> Any:
        return await both(decoded(raws, context), context)
    return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serializer)


async def admit(identify: Callable[[Any], Any], admission: Admission,
                ctx: CallContext) -> Hashable | None:
    """Wait on the loop for the work slot of the call behind ``ctx`` (its
    caller from ``identify``), up to the call's deadline. Returns the
    identity holding the slot (to give back with ``admission.release``),
    or None: the caller is not identified (the gate refuses it) or it was
    refused while waiting (``ctx.admission`` is then that error, which the
    gate audits and answers). A cancelled call leaves the queue."""
    caller = identify(ctx)
    if isinstance(caller, SignerdError):
        return None
    try:
        await admission.acquire_async(caller.identity, ctx.time_remaining())
    except SignerdError as e:
        ctx.admission = e
        return None
    ctx.admission = True
    who: Hashable = caller.identity
    return who


async def sign_stream(
    identify: Callable[[Any], Any],
    refuse: Callable[[Any, str, SignerdError], None],
    slot: Callable[[Any, Any, str], AbstractContextManager[None]],
    sign_items: Callable[[Any, Any, list[Any]], Any],
    inline: Callable[[str, Any], bool],
    executor: futures.ThreadPoolExecutor,
    admission: Admission,
    raws: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext[Any, Any],
) -> AsyncIterator[Any]:
    """Drive one SignStream call: each request is decoded as it arrives (one
    that does not decode is its own INVALID_ARGUMENT item) and answered with
    one ``sign_items`` call, inline when ``inline("Sign", request)`` holds,
    else on ``executor``, once it has its work slot (waited for on the loop,
    as :func:`admit`); its response is yielded before the next request is
    read. The call is counted open (``slot(context, caller, "sign")``) for
    its whole life, or refused.

    Measured against reading ahead (a reader task queueing requests, each
    round answering every request already waiting in one response): gRPC
    reads one message per operation, and the loop cannot read while it
    signs, so the rounds stayed small and the queue cost more than it saved
    (793-805 against 886-913 signatures/s, 4 callers, 1 worker, alternating)."""
    ctx = CallContext(context)
    caller = identify(ctx)
    if isinstance(caller, SignerdError):
        try:
            refuse(ctx, "sign", caller)
        except Aborted as a:
            await context.abort(a.code, a.details)
        return
    loop = asyncio.get_running_loop()
    try:
        with slot(ctx, caller, "sign"):  # the stream counts against the stream bounds
            async for raw in raws:
                request = decode_sign_request(raw)
                try:
                    await admission.acquire_async(caller.identity, ctx.time_remaining())
                    ctx.admission = True
                except SignerdError as e:
                    ctx.admission = e  # this item is answered, and audited, with it
                try:
                    if (isinstance(request, SignerdError) or ctx.admission is not True
                            or inline("Sign", request)):
                        response = sign_items(ctx, caller, [request])
                    else:
                        response = await loop.run_in_executor(executor, sign_items, ctx,
                                                              caller, [request])
                except Aborted as a:
                    await context.abort(a.code, a.details)
                finally:
                    if ctx.admission is True:
                        admission.release(caller.identity)
                    ctx.admission = None
                yield response
    except Aborted as a:  # no slot free: refused, and audited, by slot
        await context.abort(a.code, a.details)


def decode_sign_request(raw: bytes) -> pb.SignRequest | SignerdError:
    """One SignStream request from its bytes, or the InvalidArgument that
    answers it when they are not a SignRequest."""
    try:
        return pb.SignRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
        return InvalidArgument("the request is not a valid SignRequest message")
