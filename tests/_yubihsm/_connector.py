"""yubihsm-connector's HTTP interface in front of the software device.

Yubico's library (libyubihsm-http, through libcurl) asks ``GET
/connector/status`` once when it connects and wants ``status=OK`` among the
``key=value`` lines, then sends each command frame as the body of ``POST
/connector/api`` and reads the answer frame back (yubihsm-shell
``lib/yubihsm_curl.c`` and ``lib/lib_util.c`` parse_status_data).
HTTP/1.1 with keep-alive, as curl reuses its connection; loopback only.
"""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests._yubihsm._device import Device

CONNECTOR_VERSION = "3.0.4"  # what this connector says it is, in the status answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body
    # waits for the client's delayed ACK, 40 ms a frame on Linux.
    disable_nagle_algorithm = True
    server: Connector

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] != "/connector/status":
            self._send(404, b"not found\n", "text/plain")
            return
        host, port = self.server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        body = (f"status=OK\nserial=*\nversion={CONNECTOR_VERSION}\npid={os.getpid()}\n"
                f"address={host}\nport={port}\n").encode()
        self._send(200, body, "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", "0"))
        request = self.rfile.read(length)
        if self.path != "/connector/api":
            self._send(404, b"not found\n", "text/plain")
            return
        self._send(200, self.server.device.handle(request), "application/octet-stream")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - inherited
        pass  # one line per frame would drown the test logs


class Connector(ThreadingHTTPServer):
    """An HTTP server for ``device`` on ``host``:``port`` (0: any free port)."""

    daemon_threads = True

    def __init__(self, device: Device, host: str = "127.0.0.1", port: int = 0) -> None:
        self.device = device
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])
