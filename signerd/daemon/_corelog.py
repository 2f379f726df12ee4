"""gRPC's C core writes its own log lines to file descriptor 2; make them JSON.

grpcio offers no Python hook for its core's logging: TLS handshake failures,
for example, reach stderr as raw lines such as

    I1201 03:26:08.792344   31394 ssl_transport_security.cc:2563] Handshake failed
    with error SSL_ERROR_SSL: ...PEER_DID_NOT_RETURN_A_CERTIFICATE...

so a serving process points fd 2 at a pipe and a thread copies it to the real
stderr line by line: signerd's own JSON lines pass unchanged, and every other
line becomes one JSON line (``logger: "grpc"``). A handshake failure is
logged as ``tls handshake failed`` with its reason and counted in
``signerd_tls_handshake_failures_total``. This is written here because no
library does it: the format is the C core's glog-style prefix (gRPC's
``src/core/util/log.cc``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable

from signerd import metrics

# <level><MMDD> <HH:MM:SS.micros> <thread> <file:line>] <message>
_CORE_LINE = re.compile(rb"^([DIWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_LEVELS = {b"D": "debug", b"I": "info", b"W": "warning", b"E": "error", b"F": "critical"}
_MAX_TEXT = 500  # characters of a core message kept in one log line
# signerd sets GRPC_VERBOSITY=INFO on purpose (handshake failures are logged
# only at INFO; see signerd.daemon.main), and gRPC then warns at every start
# that INFO "is not suitable for production": dropped, as it says nothing of
# this process.
_DROPPED = (b"Log level INFO is not suitable for production",)
# Lines the core logs as errors that are a client's mistake, not the
# daemon's: a warning, as a failed handshake is.
_CLIENT_MISTAKES = ("No match found for server name",)


def translate(raw: bytes) -> bytes:
    """One line read from fd 2, as the JSON line to write (with its newline),
    or nothing (b"") for a line dropped."""
    line = raw.rstrip(b"\r\n")
    if line.startswith(b"{") or not line.strip():
        return line + b"\n"  # signerd's own JSON line
    now = time.time()
    doc: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now * 1000) % 1000:03d}Z",
        "level": "info",
        "logger": "grpc",
    }
    match = _CORE_LINE.match(line)
    if match and match.group(3).startswith(_DROPPED):
        return b""
    text = (match.group(3) if match else line).decode("utf-8", "replace")
    if match:
        doc["level"] = _LEVELS[match.group(1)]
        doc["source"] = match.group(2).decode("utf-8", "replace")
    if text.startswith(_CLIENT_MISTAKES):
        doc["level"] = "warning"
    if "Handshake failed" in text:
        metrics.TLS_HANDSHAKE_FAILURES.inc()
        doc.update(level="warning", msg="tls handshake failed",
                   reason=text.partition("Handshake failed")[2].strip(" :")[:_MAX_TEXT])
    else:
        doc["msg"] = text[:_MAX_TEXT]
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def route_stderr() -> Callable[[], None]:
    """Send fd 2 through :func:`translate`; return the function that puts
    the real stderr back and waits for every line already written.

    Call it before anything writes from another thread, and the returned
    function after the last gRPC server has stopped. Child processes started
    meanwhile inherit the pipe, so start none (workers are started by a
    supervisor, which does not route its stderr)."""
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(real, "wb", buffering=0) as out:
            for raw in pipe:
                try:
                    out.write(translate(raw))
                except OSError:
                    return  # nowhere left to write

    thread = threading.Thread(target=pump, name="stderr", daemon=True)
    thread.start()

    def restore() -> None:
        import sys

        sys.stderr.flush()
        copy = os.dup(real)
        os.dup2(copy, 2)  # closes the pipe's last write end: the pump sees EOF
        os.close(copy)
        thread.join(5)

    return restore
