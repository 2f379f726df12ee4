"""The floor: a gRPC server that answers Sign without signing anything.

Same transport as signerd (mutual TLS, a sync server with the same thread
pool, SO_REUSEPORT workers, the same CPU pinning) and the same method path,
but the handler only reads the caller's certificate (as signerd's gate does)
and returns a fixed SignResponse. Whatever this reaches is the most any Python gRPC signer can
reach on the machine; the difference to signerd is signerd's own cost.

    python -m bench._floor --tls DIR --threads N --port-file F [--port P]
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from signerd.config import Config
from signerd.daemon import pin_cpu
from signerd.v1 import signer_pb2 as pb

RESPONSE = pb.SignResponse(key_id="0" * 64, signature=bytes(64), algorithm="ecdsa-p256",
                           method="ecdsa", encoding=pb.SIGNATURE_ENCODING_RAW).SerializeToString()


def _sign(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.auth_context()  # the gate's identity lookup reads this on every call
    return RESPONSE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tls", type=Path, required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--cpu-index", type=int, help="pin like signerd's cpu_affinity = \"spread\"")
    a = p.parse_args()
    if a.cpu_index:
        pin_cpu(Config(tokens=(), cpu_affinity="spread"), a.cpu_index)
    creds = grpc.ssl_server_credentials(
        [((a.tls / "server-key.pem").read_bytes(), (a.tls / "server.pem").read_bytes())],
        root_certificates=(a.tls / "ca.pem").read_bytes(), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(a.threads), options=[("grpc.so_reuseport", 1)])
    handler: Any = grpc.unary_unary_rpc_method_handler(_sign)  # raw bytes in and out
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("signerd.v1.SignerService", {"Sign": handler})])
    port = server.add_secure_port(f"127.0.0.1:{a.port}", creds)
    server.start()
    tmp = a.port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(a.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
