"""Readiness for systemd (``Type=notify``), written by hand: no libsystemd.

The protocol (sd_notify(3), "Description" and "Notes"): the service manager
sets ``NOTIFY_SOCKET`` to a Unix datagram socket, a path or, starting with
``@``, an abstract name; the service sends newline-separated ``KEY=VALUE``
fields in one datagram. signerd sends ``READY=1`` once it serves,
``RELOADING=1`` (with ``MONOTONIC_USEC``, which systemd 253+ wants for
``Type=notify-reload``) then ``READY=1`` around a SIGHUP reload, and
``STOPPING=1`` when it starts shutting down. With ``[server] workers`` > 1
only the supervisor, the main PID, notifies: the workers get no
``NOTIFY_SOCKET`` (systemd's ``NotifyAccess=main`` would ignore them).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("signerd")

READY = "READY=1"
STOPPING = "STOPPING=1"


def reloading() -> str:
    """``RELOADING=1`` with the CLOCK_MONOTONIC time (µs) the reload started."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram to
    ``$NOTIFY_SOCKET``. Returns False when there is no service manager to
    tell (no or an unsupported address, such as ``vsock:``) or the send
    fails; a failure is logged, never raised: systemd then times the start
    out itself, which is the visible outcome."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(fields).encode())
    except OSError as e:
        log.warning("cannot notify the service manager",
                    extra={"fields": {"notify_socket": os.environ.get("NOTIFY_SOCKET"),
                                      "error": e.strerror or str(e)}})
        return False
    return True
