"""The floor: a gRPC server that answers Sign without signing anything.

Same transport as signerd (mutual TLS, SO_REUSEPORT workers, the same CPU
pinning) and the same method paths, but the handlers only read the caller's
certificate (as signerd's gate does) and return a fixed answer: Sign a fixed
SignResponse, SignStream a fixed one-item SignStreamResponse per request message, in order.
Two Python gRPC stacks, so the benchmark can report the better of them:

``sync``  grpcio's sync server with a thread pool of ``--threads``, as signerd runs;
``aio``   ``grpc.aio`` on a ``uvloop`` event loop, one thread.

Whatever the better one reaches is the most any Python gRPC signer can reach on
the machine; the difference to signerd is signerd's own cost.

    python -m bench._floor --tls DIR --port-file F [--mode sync|aio] [--threads N] [--port P]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from signerd.config import Config
from signerd.daemon import pin_cpu
from signerd.v1 import signer_pb2 as pb

SERVICE = "signerd.v1.SignerService"
_SIGNED = pb.SignResponse(key_id="0" * 64, signature=bytes(64), algorithm="ecdsa-p256",
                          method="ecdsa", encoding=pb.SIGNATURE_ENCODING_RAW)
RESPONSE = _SIGNED.SerializeToString()
# One response per request message: the most messages signerd's SignStream ever sends.
STREAM_ITEM = pb.SignStreamResponse(items=[pb.SignBatchItem(code=0, response=_SIGNED)]
                                    ).SerializeToString()
MODES = ("sync", "aio")


def _sign(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.auth_context()  # the gate's identity lookup reads this on every call
    return RESPONSE


def _sign_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    context.auth_context()
    for _ in requests:
        yield STREAM_ITEM


async def _sign_aio(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    context.auth_context()
    return RESPONSE


async def _sign_stream_aio(requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext[bytes, bytes],
                           ) -> AsyncIterator[bytes]:
    context.auth_context()
    async for _ in requests:
        yield STREAM_ITEM


def _handlers(mode: str) -> grpc.GenericRpcHandler:
    """Sign and SignStream on raw bytes (no deserialiser: nothing is parsed)."""
    sign: Any = _sign_aio if mode == "aio" else _sign
    stream: Any = _sign_stream_aio if mode == "aio" else _sign_stream
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Sign": grpc.unary_unary_rpc_method_handler(sign),
        "SignStream": grpc.stream_stream_rpc_method_handler(stream),
    })


def _credentials(tls: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [((tls / "server-key.pem").read_bytes(), (tls / "server.pem").read_bytes())],
        root_certificates=(tls / "ca.pem").read_bytes(), require_client_auth=True)


def _ready(port_file: Path, port: int) -> None:
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)


def serve_sync(a: argparse.Namespace) -> None:
    """The grpcio sync server until SIGTERM."""
    server = grpc.server(futures.ThreadPoolExecutor(a.threads), options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers([_handlers("sync")])
    port = server.add_secure_port(f"127.0.0.1:{a.port}", _credentials(a.tls))
    server.start()
    _ready(a.port_file, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


async def serve_aio(a: argparse.Namespace) -> None:
    """The grpc.aio server (on whatever loop runs this: uvloop in main) until SIGTERM."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers([_handlers("aio")])
    port = server.add_secure_port(f"127.0.0.1:{a.port}", _credentials(a.tls))
    await server.start()
    _ready(a.port_file, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    """Serve until SIGTERM; write the bound port to --port-file once serving."""
    p = argparse.ArgumentParser()
    p.add_argument("--tls", type=Path, required=True)
    p.add_argument("--mode", choices=MODES, default="sync")
    p.add_argument("--threads", type=int, default=8, help="sync mode's thread pool")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--cpu-index", type=int, help="pin like signerd's cpu_affinity = \"spread\"")
    a = p.parse_args()
    if a.cpu_index:
        pin_cpu(Config(tokens=(), cpu_affinity="spread"), a.cpu_index)
    if a.mode == "aio":
        import uvloop

        uvloop.run(serve_aio(a))
    else:
        serve_sync(a)


if __name__ == "__main__":
    main()
