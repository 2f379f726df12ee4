"""What signerctl's command modules share: client connection, output, errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from signerd.client import (
    MAX_TIMEOUT,
    Client,
    ClientConfig,
    connect_failure,
    valid_server,
    valid_timeout,
)


class CliError(Exception):
    """A failure to report as one line on stderr."""


def rpc_error_line(code_name: str, details: str, server: str | None) -> str:
    """The one line signerctl prints for a failed call: the status and the
    daemon's message, or, when signerd could not be reached at all, what
    failed and what to check: a TLS handshake that failed, or nothing that
    answered (see :func:`signerd.client.connect_failure`). gRPC's transport
    text (``failed to connect to all addresses; last error: ...``, a stray
    ``: OK``) is cut down to its reason."""
    where = f"signerd at {server}" if server else "signerd"
    failed = connect_failure(server or "", details) if code_name == "UNAVAILABLE" else None
    if failed is not None and failed.handshake:
        return (f"TLS handshake with {where} failed ({failed.reason}); "
                "check --tls-ca, --tls-cert, --tls-key and --server-name")
    if failed is not None:
        return (f"cannot reach {where} ({failed.reason}); is 'signerd serve' running, "
                "and is --server right?")
    if code_name == "DEADLINE_EXCEEDED":
        return f"{where} did not answer in time; is it overloaded, or is --server right?"
    return f"{code_name}: {details.removesuffix(': OK')}"


def seconds(text: str) -> float:
    """argparse type of --timeout: a number of seconds more than 0 and at
    most MAX_TIMEOUT (not NaN, not infinite)."""
    try:
        value = valid_timeout(float(text))
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(
            f"must be seconds, a number more than 0 and at most {MAX_TIMEOUT:g}, not {text!r}")
    return value


def whole_number(low: int, high: int, unit: str, hint: str = "") -> Callable[[str], int]:
    """argparse type: a whole number of ``unit`` from ``low`` to ``high``;
    ``hint`` ends the error message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number of {unit} from {low} to {high}, not {text!r}{hint}")
        return value

    return parse


def server_address(value: str) -> str:
    """argparse type for signerd's address (see signerd.client.valid_server)."""
    if not valid_server(value):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT or unix:/path/to/signerd.sock, got {value!r}")
    return value


def add_client_options(p: argparse.ArgumentParser, server_flag: str = "--server") -> None:
    """signerctl's options for reaching signerd. ``trust`` commands name the
    server flag ``--signerd``, since their ``--server`` is the Notary server."""
    p.add_argument("--config", type=Path, help="client config (default: the embedded daemon's)")
    p.add_argument(server_flag, dest="server", metavar="HOST:PORT", type=server_address,
                   help="signerd: host:port (mutual TLS) or unix:/path/signerd.sock")
    p.add_argument("--tls-ca", type=Path, help="CA bundle that signed signerd's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate")
    p.add_argument("--tls-key", type=Path, help="client certificate's private key")
    p.add_argument("--server-name", help="expected name in signerd's certificate")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help=f"seconds per signerd call, at most {MAX_TIMEOUT:g}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true",
                   help="on an unexpected error, print its traceback")


def client_config(args: argparse.Namespace) -> ClientConfig:
    path = args.config or ClientConfig.default_path()
    if path.exists():
        cfg = ClientConfig.load(path)
    elif args.server is None:
        raise CliError(
            f"no client config at {path}; start 'signerd serve' once, "
            "or pass --server with --tls-ca/--tls-cert/--tls-key"
        )
    else:
        cfg = ClientConfig(args.server)
    return ClientConfig(
        server=args.server or cfg.server,
        ca=args.tls_ca or cfg.ca,
        cert=args.tls_cert or cfg.cert,
        key=args.tls_key or cfg.key,
        server_name=args.server_name or cfg.server_name,
        timeout=args.timeout or cfg.timeout,
        plaintext=cfg.plaintext,
    )


def connect(args: argparse.Namespace) -> Client:
    return Client(client_config(args))


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(table())
