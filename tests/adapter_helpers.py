"""What the python-tuf and cosign adapter tests share: client.toml files for a
test daemon, and an address where no daemon listens."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from signerd.client import ClientConfig
from tests.conftest import ADMIN_POLICY, RUNNER


def write_client_toml(cfg: ClientConfig, path: Path) -> Path:
    """Write ``cfg`` as signerctl's client.toml (absolute TLS paths)."""
    lines = [f"server = {json.dumps(cfg.server)}", f"timeout = {cfg.timeout}"]
    for name in ("ca", "cert", "key", "server_name"):
        value = getattr(cfg, name)
        if value is not None:
            lines.append(f"{name} = {json.dumps(str(value))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# signerd policy: the admin may do anything; the runner may only read keys.
RUNNER_READS_POLICY = ADMIN_POLICY + f"""
[[rule]]
name = "runner-reads"
identities = ["{RUNNER}"]
operations = ["read"]
"""
