"""File descriptors: how many one serving process may spend on connections.

Every connection a listener holds is a file descriptor, and so is every
token session's file, the audit log, gRPC's own pollers and the modules'
sockets. When the open-file limit (RLIMIT_NOFILE, 1,024 soft under a
default systemd service) runs out, ``accept`` fails in a loop ("File
descriptor limit reached"), a PKCS#11 module cannot open its files
(SoftHSM then answers CKR_CRYPTOKI_NOT_INITIALIZED) and the audit log cannot
rotate: slow unauthenticated connections took the whole daemon down that way.

So at start a serving process raises its soft limit to the hard one
(:func:`raise_limit`), keeps a reserve for everything that is not a
connection, and gives each listener at most its share of the rest
(:func:`plan`): a listener that is full closes new connections, it never
takes the reserve.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

from signerd.errors import ConfigError

log = logging.getLogger("signerd")

# What one process holds besides connections, measured on a running daemon
# (/proc/PID/fd: 41 with one SoftHSM token, audit log and all three
# listeners idle) and doubled: the interpreter, shared libraries, gRPC's
# epoll and wake-up fds, logging, the ready file.
RESERVED_BASE = 96
# Per token: the module's own files (SoftHSM opens an object file per key and
# its lock files; a TPM a socket to tpm2-abrmd or /dev/tpmrm0) and one per
# pooled session.
RESERVED_PER_TOKEN = 32
RESERVED_AUDIT = 8  # the log, its directory and a rotation's new file
# File descriptors one held connection costs, by listener. A Unix socket
# connection is the accepted socket, the relay's socket to the private gRPC
# socket and gRPC's end of it (signerd.server._unix).
COST = {"tcp": 1, "unix": 3, "metrics": 1}
# Below this many connections a listener is no longer worth serving: refuse
# to start instead (raise LimitNOFILE, or serve fewer listeners per process).
MIN_SHARE = 16
_NR_OPEN = Path("/proc/sys/fs/nr_open")  # the kernel's ceiling for RLIMIT_NOFILE


@dataclass(frozen=True)
class Budget:
    """Connections each listener of one process may hold at once (0: the
    process does not serve that listener), under ``limit`` file descriptors
    of which ``reserved`` are kept for everything else."""

    limit: int
    reserved: int
    tcp: int
    unix: int
    metrics: int


def raise_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (to the
    kernel's ``fs.nr_open`` when the hard one is unlimited) and return the
    soft limit now in force. A refused raise leaves the soft limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            hard = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            hard = 1 << 20  # Linux's default nr_open
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        log.warning("cannot raise the open-file limit", extra={"fields": {
            "soft": soft, "hard": hard, "error": str(e)}})
        return soft
    return hard


def plan(limit: int, tokens: int, audit: bool, wanted: dict[str, int]) -> Budget:
    """Share ``limit`` file descriptors among the listeners of one process.

    ``wanted`` maps a listener ("tcp", "unix", "metrics"; one absent or 0 is
    not served) to its configured connection cap. When the caps, each times
    its :data:`COST`, fit in what ``limit`` leaves after the reserve
    (:data:`RESERVED_BASE`, :data:`RESERVED_PER_TOKEN` per token,
    :data:`RESERVED_AUDIT`), they are kept; otherwise every cap is scaled
    down by the same factor (its share) and a warning says so. Raises
    ConfigError when a served listener's share would be under
    :data:`MIN_SHARE` connections."""
    reserved = RESERVED_BASE + RESERVED_PER_TOKEN * tokens + (RESERVED_AUDIT if audit else 0)
    caps = {name: wanted.get(name, 0) for name in COST}
    need = sum(COST[name] * cap for name, cap in caps.items())
    free = limit - reserved
    if need > free:
        shares = {name: max(0, free) * cap // need for name, cap in caps.items()}
        short = [name for name, cap in caps.items() if cap and shares[name] < MIN_SHARE]
        settings = {"tcp": "server.max_connections", "unix": "server.max_unix_connections",
                    "metrics": "metrics.max_connections"}
        if short:
            raise ConfigError(
                f"the open-file limit ({limit}) leaves {max(0, free)} file descriptors for "
                f"connections after {reserved} kept for tokens and the audit log, too few for "
                f"{', '.join(settings[n] for n in short)} (at least {MIN_SHARE} each); "
                f"raise LimitNOFILE to at least {reserved + need} or lower the caps")
        log.warning("the open-file limit is too low for the configured connection caps; "
                    "each listener gets its share", extra={"fields": {
                        "limit": limit, "reserved": reserved,
                        **{settings[n]: shares[n] for n in caps if caps[n]}}})
        caps = shares
    return Budget(limit, reserved, caps["tcp"], caps["unix"], caps["metrics"])
