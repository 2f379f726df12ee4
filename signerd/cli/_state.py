"""signerctl's verbs about what the content checks rely on: a key's purpose
(``keys set-purpose``) and the recorded watermarks (``state show``, ``state reset``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from signerd.cli._util import CliError, connect, emit
from signerd.client import PURPOSE_NAMES
from signerd.keys import PURPOSES
from signerd.v1 import signer_pb2 as pb


def purpose_name(k: pb.Key) -> str:
    """A key's purpose as signerctl prints it (``metadata`` or ``raw``)."""
    return PURPOSE_NAMES.get(k.purpose, "metadata")


def cmd_keys_set_purpose(args: argparse.Namespace) -> None:
    with connect(args) as c:
        before = c.get_key(args.key_id)
        k = c.set_key_purpose(args.key_id, args.purpose)
    was = purpose_name(before)
    emit(args, {"key_id": k.key_id, "purpose": purpose_name(k), "previous_purpose": was},
         lambda: f"key {k.key_id} ({k.role} of {k.gun}) is now a {purpose_name(k)} key "
                 f"(was {was})")


def _state_dict(resp: pb.GetStateResponse) -> dict[str, Any]:
    return {"gun": resp.gun, "roles": [
        {"role": r.role, "version": r.version, "sha256": r.sha256, "signed_at": r.signed_at,
         "meta": {m.name: m.version for m in r.meta}} for r in resp.roles]}


def _state_lines(resp: pb.GetStateResponse) -> str:
    if not resp.roles:
        return f"no versions recorded for {resp.gun}"
    lines = [f"{resp.gun}:"]
    for r in resp.roles:
        meta = ", ".join(f"{m.name} v{m.version}" for m in r.meta)
        lines.append(f"  {r.role}: version {r.version}, signed {r.signed_at}"
                     + (f"; references {meta}" if meta else ""))
    return "\n".join(lines)


def cmd_state_show(args: argparse.Namespace) -> None:
    with connect(args) as c:
        resp = c.get_state(args.gun)
    emit(args, _state_dict(resp), lambda: _state_lines(resp))


def cmd_state_reset(args: argparse.Namespace) -> None:
    if not args.yes:
        what = (f"forget every version recorded for {args.gun}: signerd will sign older "
                "metadata for it again")
        if not sys.stdin.isatty():
            raise CliError(f"this would {what}; pass --yes to reset it")
        print(f"{what[0].upper()}{what[1:]}. Reset? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CliError(f"state of {args.gun} not reset")
    with connect(args) as c:
        removed = c.reset_state(args.gun)
    emit(args, {"gun": args.gun, "removed": removed},
         lambda: f"reset the recorded versions of {args.gun} ({removed} rows removed)")


def register(sub: Any, keys: Any, common: argparse.ArgumentParser) -> None:
    """Add ``keys set-purpose`` to ``keys`` and ``state show|reset`` to ``sub``."""
    p = keys.add_parser("set-purpose", parents=[common],
                        help="set what an existing key signs (an audited admin verb)")
    p.add_argument("key_id")
    p.add_argument("purpose", choices=PURPOSES)
    p.set_defaults(func=cmd_keys_set_purpose)

    state = sub.add_parser("state", help="versions the content checks recorded").add_subparsers(
        dest="state_cmd", required=True)
    p = state.add_parser("show", parents=[common], help="the versions recorded for a GUN")
    p.add_argument("gun")
    p.set_defaults(func=cmd_state_show)
    p = state.add_parser("reset", parents=[common],
                         help="forget a GUN's recorded versions (after a legitimate wipe)")
    p.add_argument("gun")
    p.add_argument("--yes", action="store_true", help="reset without asking")
    p.set_defaults(func=cmd_state_reset)
