"""Unix domain socket listener with peer-credential identity.

grpcio does not expose SO_PEERCRED, so the Unix socket is served by a small
relay: each accepted connection's uid is read with SO_PEERCRED, and its bytes
are relayed to an internal gRPC port on 127.0.0.1 that only the relay uses.
The relay's source port is mapped to the uid (see UnixPeers), so the gRPC
handlers know which uid is calling. A stray connection straight to the
internal port has no mapping and is refused as unauthenticated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from pathlib import Path

from signerd.server._identity import UnixPeers

log = logging.getLogger("signerd.server")
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class UnixRelay:
    def __init__(self, path: Path, target_port: int, peers: UnixPeers, mode: int = 0o660) -> None:
        self.path = path
        self._target = ("127.0.0.1", target_port)
        self._peers = peers
        self._mode = mode
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a previous run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self._mode)  # no window with looser permissions
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self._mode)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, name="unix-accept", daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        _, uid, _ = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        try:
            upstream = socket.create_connection(self._target)
        except OSError as e:
            log.error(
                "unix relay cannot reach the internal port", extra={"fields": {"error": str(e)}}
            )
            conn.close()
            return
        host, port = upstream.getsockname()[:2]
        peer = f"ipv4:{host}:{port}"
        self._peers.add(peer, uid)
        with self._lock:
            self._conns.update((conn, upstream))
        back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        back.start()
        _pump(conn, upstream)
        back.join()
        self._peers.remove(peer)
        with self._lock:
            self._conns.difference_update((conn, upstream))
        conn.close()
        upstream.close()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
