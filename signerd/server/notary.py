"""Notary-compatible KeyManagement and Signer services (package ``proto``).

Placeholder: implemented for the Notary compatibility issue.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from signerd.errors import SignerdError
from signerd.server._gate import Caller, Gate
from signerd.service import KeyService

Identify = Callable[[grpc.ServicerContext], Caller | SignerdError]


def add_to_server(server: grpc.Server, service: KeyService, gate: Gate,
                  identify: Identify) -> list[str]:
    """Add the Notary services to ``server``; return the names to report in
    health and reflection."""
    return []
