"""signerd: a gRPC daemon that keeps TUF / Docker Content Trust keys on PKCS#11 tokens."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn


def version() -> str:
    """signerd's version, from the installed package's metadata (pyproject.toml's
    ``version``); ``"unknown (not installed)"`` when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("signerd")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """Like argparse's ``version`` action, but reads the metadata only when
    asked: importlib.metadata costs tens of milliseconds on every run."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0."""
    parser.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
                        help="print the version and exit")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr, ``PROG:
    MESSAGE (see 'PROG --help')``, and exit status 2 (argparse prints the
    usage first). Sub-parsers are of this class too (add_subparsers makes
    them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with ``message`` as one line; a missing command is named
        by its choices, not by the sub-parsers' dest (``keys_cmd``)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and message == \
                    f"the following arguments are required: {action.dest}":
                names = list(action.choices)
                listed = f"{', '.join(names[:-1])} or {names[-1]}" if names[1:] else names[0]
                message = f"a command is required: {listed}"
        self.exit(2, f"{self.prog}: {one_line(message)} (see '{self.prog} --help')\n")
