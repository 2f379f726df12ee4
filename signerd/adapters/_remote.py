"""What signerd's client adapters share: signerctl's client config, and gRPC
failures turned into one line that names the status.

Used by :mod:`signerd.tuf_signer` (python-tuf / securesystemslib) and
:mod:`signerd.adapters.cosign` (cosign's KMS plugin). Each adapter converts
:class:`RemoteError` into its own ecosystem's error type.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from signerd.client import Client, ClientConfig, connect_failure
from signerd.errors import ConfigError, SignerdError

# What a status usually means to someone pointing a tool at signerd.
_HINTS = {
    "UNAVAILABLE": "is signerd running and reachable at that address?",
    "UNAUTHENTICATED": "signerd could not identify the client certificate",
    "DEADLINE_EXCEEDED": "signerd did not answer in time",
}


class RemoteError(SignerdError):
    """A signerd.v1 call failed.

    ``status`` is the gRPC status name (``"NOT_FOUND"``, ``"PERMISSION_DENIED"``,
    ``"UNAVAILABLE"``...); the message names it, the server and the call.
    """

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def load_client_config(path: Path | None = None) -> ClientConfig:
    """signerctl's client config: ``path``, else ``$SIGNERCTL_CONFIG``, else the
    embedded daemon's ``client.toml`` (``ClientConfig.default_path()``).

    Raises ConfigError if the file is missing or unusable.
    """
    path = path or ClientConfig.default_path()
    if not path.exists():
        raise ConfigError(
            f"no signerd client config at {path}: set SIGNERCTL_CONFIG to one "
            "(server, ca, cert, key), or start 'signerd serve' once to write it"
        )
    return ClientConfig.load(path)


@contextmanager
def rpc(cfg: ClientConfig, call: str) -> Iterator[None]:
    """Run a signerd.v1 ``call`` (e.g. ``"GetKey abc1..."``); a grpc.RpcError
    becomes :class:`RemoteError` naming the status, the server and the call."""
    try:
        yield
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        status = code.name if code is not None else "UNKNOWN"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        hint = f" ({_HINTS[status]})" if status in _HINTS else ""
        failed = connect_failure(cfg.server, details or "") if status == "UNAVAILABLE" else None
        if failed is not None and failed.handshake:  # signerd runs: not _HINTS' question
            hint = (f" (the TLS handshake failed: {failed.reason}; check the client config's "
                    "ca, cert, key and server_name)")
        raise RemoteError(
            f"signerd at {cfg.server}: {call} failed with {status}{hint}: {details}", status
        ) from None


@contextmanager
def calling(cfg: ClientConfig, call: str) -> Iterator[Client]:
    """A client for one signerd.v1 ``call``, closed afterwards; failures are
    :class:`RemoteError` (see :func:`rpc`), or ConfigError for unreadable TLS files."""
    with Client(cfg) as client, rpc(cfg, call):
        yield client
