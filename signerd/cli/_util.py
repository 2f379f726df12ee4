"""What signerctl's command modules share: client connection, output, errors."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from signerd import ArgumentParser
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


class UsageError(CliError):
    """A command line that cannot mean anything (options that need each other,
    say): one line on stderr, as argparse's own usage errors, and exit 2."""


class CliParser(ArgumentParser):
    """signerd's parser, which also names an unknown option that swallowed
    the next word. ``signerctl --sever 127.0.0.1:4443 keys list`` leaves
    ``--sever`` aside and takes ``127.0.0.1:4443`` as the command; argparse
    then says only ``invalid choice: '127.0.0.1:4443'``. Sub-parsers are of
    this class too."""

    _words: list[str] = []

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._words, namespace)

    def error(self, message: str) -> NoReturn:
        """As ArgumentParser.error, with the unknown option named."""
        bad = re.search(r"invalid choice: '(.*?)'", message)
        if bad is not None and bad.group(1) in self._words:
            i = self._words.index(bad.group(1))
            before = self._words[i - 1] if i else ""
            if before.startswith("-") and before.split("=")[0] not in \
                    self._option_string_actions:
                near = difflib.get_close_matches(before, list(self._all_options()), n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                message = f"unrecognized option {before}{hint}"
        super().error(message)

    def _all_options(self) -> Iterator[str]:
        """Every option string of this parser and its sub-parsers."""
        yield from (o for o in self._option_string_actions if o.startswith("--"))
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if isinstance(sub, CliParser):
                        yield from sub._all_options()


def rpc_error_line(code_name: str, details: str, server: str | None) -> str:
    """The one line signerctl prints for a failed call: the status and the
    daemon's message, or, when signerd could not be reached at all, what
    failed and what to check: a TLS handshake that failed, or nothing that
    answered (see :func:`signerd.client.connect_failure`). gRPC's transport
    text (``failed to connect to all addresses; last error: ...``, a stray
    ``: OK``) is cut down to its reason."""
    where = f"signerd at {server}" if server else "signerd"
    failed = connect_failure(server or "", details) if code_name == "UNAVAILABLE" else None
    if failed is not None and failed.not_tls:
        return (f"{server} answered, but not with TLS: is it signerd's gRPC port ([server] "
                "listen), not its metrics port or another service? Check --server")
    if failed is not None and failed.handshake:
        return (f"TLS handshake with {where} failed ({failed.reason}); "
                "check --tls-ca, --tls-cert, --tls-key and --server-name")
    if failed is not None:
        return (f"cannot reach {where} ({failed.reason}); is 'signerd serve' running, "
                "and is --server right?")
    if code_name == "DEADLINE_EXCEEDED":
        return f"{where} did not answer in time; is it overloaded, or is --server right?"
    too_big = _TOO_BIG.search(details) if code_name == "RESOURCE_EXHAUSTED" else None
    if too_big is not None:
        sent, limit = too_big.groups()
        return (f"the request was {sent} bytes, more than {where} accepts ({limit} bytes, its "
                f"[server] max_message_bytes); set max_message_bytes = {limit} in the client "
                "config, and signerctl sends bigger files by their digest")
    return f"{code_name}: {details.removesuffix(': OK')}"


# gRPC's text for a message over a max_receive_message_length.
_TOO_BIG = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


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


def _named_by(args: argparse.Namespace) -> str | None:
    """What named the client config: "--config", "$SIGNERCTL_CONFIG", or None
    for the embedded daemon's default."""
    if args.config is not None:
        return "--config"
    return "$SIGNERCTL_CONFIG" if os.environ.get("SIGNERCTL_CONFIG") else None


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client config the flags and the config file make together (a
    flag wins). Raises CliError or ConfigError, one line each: a config
    named by --config or $SIGNERCTL_CONFIG that is missing or unreadable; no
    default one and no --server; a default one that cannot be read and no
    --server (with --server, an unreadable default is passed over: the
    flags name the daemon)."""
    named_by = _named_by(args)
    path = args.config or ClientConfig.default_path()
    try:
        with open(path, "rb"):
            readable: OSError | None = None
    except OSError as e:
        readable = e
    if isinstance(readable, FileNotFoundError | NotADirectoryError):
        if named_by is not None:
            raise CliError(f"no client config at {path} (named by {named_by}); check the path")
        if args.server is None:
            raise CliError(
                f"no client config at {path}; start 'signerd serve' once, "
                "or pass --server with --tls-ca/--tls-cert/--tls-key"
            )
        cfg = ClientConfig(args.server)
    elif readable is not None:
        if named_by is not None or args.server is None:
            raise CliError(
                f"cannot read client config {path}: {readable.strerror}; run signerctl as the "
                "user that owns it, or pass --config, or --server with "
                "--tls-ca/--tls-cert/--tls-key")
        cfg = ClientConfig(args.server)
    else:
        cfg = ClientConfig.load(path)
    return ClientConfig(
        server=args.server or cfg.server,
        ca=args.tls_ca or cfg.ca,
        cert=args.tls_cert or cfg.cert,
        key=args.tls_key or cfg.key,
        server_name=args.server_name or cfg.server_name,
        timeout=args.timeout or cfg.timeout,
        plaintext=cfg.plaintext,
        max_message_bytes=cfg.max_message_bytes,
    )


def connect(args: argparse.Namespace) -> Client:
    return Client(client_config(args))


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(table())
