"""Unix domain socket listener with peer-credential identity.

grpcio does not expose SO_PEERCRED, so the Unix socket is served by a small
relay: each accepted connection's uid is read with SO_PEERCRED, and its bytes
are relayed to an internal gRPC listener that only the relay can reach: a
Unix socket in a private directory (mode 0700, made with mkdtemp), so no
other user can connect to it, find it with ``ss -ltn`` or fill it. Before
connecting, the relay binds its own end to a unique path in that directory
(``c<N>``, unlinked once connected); gRPC reports that path as the peer
(``unix:<dir>/c<N>``), and UnixPeers maps it to the uid, so the gRPC
handlers know which uid is calling. A connection to the internal socket
that did not come through the relay (only root can make one) has no mapping
and is refused as unauthenticated.

Before "Hardening, round 3" the internal listener was a plaintext TCP port on
127.0.0.1: any local user could hold 1,100 connections to it, and every
Unix socket client then got UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

from signerd.errors import ConfigError
from signerd.server._identity import UnixPeers

log = logging.getLogger("signerd.server")
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the NUL (unix(7))


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
    """The Unix socket at ``path`` (``mode``), relayed to a private gRPC
    listener (:attr:`internal`, a ``unix:`` address to serve with gRPC
    before :meth:`start`). At most ``max_connections`` connections at once;
    past it, new ones are closed at once. Raises ConfigError if the private
    directory's paths would be too long for a Unix socket (set TMPDIR)."""

    def __init__(self, path: Path, peers: UnixPeers, mode: int = 0o660,
                 max_connections: int = 256) -> None:
        self.path = path
        self._peers = peers
        self._mode = mode
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._names = itertools.count()
        self.private = Path(tempfile.mkdtemp(prefix="signerd-relay-"))  # mode 0700
        self._target = str(self.private / "grpc")
        if len(os.fsencode(self.private / f"c{1 << 32}")) > SUN_PATH_MAX:
            shutil.rmtree(self.private, ignore_errors=True)
            raise ConfigError(f"the relay's private directory {self.private} is too long a "
                              f"path for a Unix socket; set TMPDIR to a shorter directory")
        self.internal = f"unix:{self._target}"

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
            if not self._slots.acquire(blocking=False):
                conn.close()  # full: closed at once, as gRPC does past max_connections
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _connect(self) -> tuple[socket.socket, str]:
        """A connection to the internal listener from a unique bound name,
        and the peer string gRPC reports for it."""
        name = str(self.private / f"c{next(self._names)}")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(name)
            try:
                upstream.connect(self._target)
            finally:
                os.unlink(name)  # the name stays the socket's address; the file goes
        except OSError:
            upstream.close()
            raise
        return upstream, f"unix:{name}"

    def _serve(self, conn: socket.socket) -> None:
        try:
            _, uid, _ = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            try:
                upstream, peer = self._connect()
            except OSError as e:
                log.error("unix relay cannot reach the internal listener",
                          extra={"fields": {"error": str(e)}})
                conn.close()
                return
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
        finally:
            self._slots.release()

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

    def remove_private(self) -> None:
        """Remove the private directory (once the gRPC server has stopped)."""
        shutil.rmtree(self.private, ignore_errors=True)
