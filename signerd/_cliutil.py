"""What signerctl's command modules share: client connection, output, errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from signerd.client import Client, ClientConfig


class CliError(Exception):
    """A failure to report as one line on stderr."""


def rpc_error_line(code_name: str, details: str, server: str | None) -> str:
    """The one line signerctl prints for a failed call: the status and the
    daemon's message, or, when signerd could not be reached at all, what
    failed and what to check. gRPC's transport text (``failed to connect to
    all addresses; last error: ...``, a stray ``: OK``) is cut down to its
    reason."""
    where = f"signerd at {server}" if server else "signerd"
    if code_name == "UNAVAILABLE" and "failed to connect to all addresses" in details:
        reason = details.rpartition("last error: ")[2].removesuffix(": OK")
        reason = reason.split(": ", 2)[-1] if reason.startswith("UNKNOWN: ") else reason
        if "handshake" in reason.lower() or "SSL_ERROR" in reason:
            return (f"TLS handshake with {where} failed ({reason.rpartition(': ')[2]}); "
                    "check --tls-ca, --tls-cert, --tls-key and --server-name")
        return (f"cannot reach {where} ({reason}); is 'signerd serve' running, "
                "and is --server right?")
    if code_name == "DEADLINE_EXCEEDED":
        return f"{where} did not answer in time; is it overloaded, or is --server right?"
    return f"{code_name}: {details.removesuffix(': OK')}"


def add_client_options(p: argparse.ArgumentParser, server_flag: str = "--server") -> None:
    """signerctl's options for reaching signerd. ``trust`` commands name the
    server flag ``--signerd``, since their ``--server`` is the Notary server."""
    p.add_argument("--config", type=Path, help="client config (default: the embedded daemon's)")
    p.add_argument(server_flag, dest="server", metavar="HOST:PORT",
                   help="signerd: host:port (mutual TLS) or unix:/path/signerd.sock")
    p.add_argument("--tls-ca", type=Path, help="CA bundle that signed signerd's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate")
    p.add_argument("--tls-key", type=Path, help="client certificate's private key")
    p.add_argument("--server-name", help="expected name in signerd's certificate")
    p.add_argument("--timeout", type=float, help="seconds per signerd call")
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
    )


def connect(args: argparse.Namespace) -> Client:
    return Client(client_config(args))


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(table())
