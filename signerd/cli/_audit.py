"""``signerctl audit vkey``, ``audit prove`` and ``audit verify --checkpoint``:
the audit log's transparency half for people (see Transparency in
:mod:`signerd.audit`). Everything is read from files; nothing needs the
daemon. Proofs are RFC 9162 proofs over the log's tiles, printed as base64
hashes one a line, so any RFC 9162 implementation can check them against
the signed checkpoint."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from signerd.audit import TileFiles, tree_dir, vkey_of
from signerd.audit._line import _parse
from signerd.audit._verify import _open_log
from signerd.cli._util import CliError, emit
from signerd.errors import ConfigError
from signerd.tlog import merkle
from signerd.tlog.merkle import leaf_hash
from signerd.tlog.note import Checkpoint, Note, NoteError, Verifier


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _tree(log: Path) -> tuple[Checkpoint, int, TileFiles]:
    """The last checkpoint (signature checked with the tree's own vkey),
    the tree's base seq, and its tiles."""
    directory = tree_dir(log)
    try:
        vkey = Verifier.from_vkey(vkey_of(log))
        note = Note.parse((directory / "checkpoint").read_bytes())
        if not note.verified_by(vkey):
            raise CliError(f"{directory}/checkpoint is not signed by {vkey.vkey()}")
        base = int(json.loads((directory / "tree.json").read_text())["base"])
        return Checkpoint.parse(note.text), base, TileFiles(directory)
    except (OSError, ValueError, KeyError, NoteError, ConfigError) as e:
        raise CliError(f"{directory}: {getattr(e, 'strerror', None) or e}") from None


def cmd_vkey(args: argparse.Namespace) -> None:
    """Print the log's verifier key (c2sp.org/signed-note vkey form)."""
    try:
        vkey = vkey_of(Path(args.log))
    except ConfigError as e:
        raise CliError(str(e)) from None
    emit(args, {"log": args.log, "vkey": vkey}, lambda: vkey)


def cmd_prove(args: argparse.Namespace) -> None:
    """Print an inclusion proof of line ``--inclusion SEQ`` or a consistency
    proof from tree size ``--consistency OLD``, to the last checkpoint."""
    cp, base, tiles = _tree(Path(args.log))
    store = tiles.store(cp.size)
    data: dict[str, Any] = {"origin": cp.origin, "size": cp.size, "root": _b64(cp.root)}
    try:
        if args.inclusion is not None:
            if not base < args.inclusion <= base + cp.size:
                raise CliError(f"no proof: line {args.inclusion} is not in the last "
                               f"checkpoint's tree, which holds lines {base + 1} to "
                               f"{base + cp.size}")
            index = args.inclusion - base - 1  # RFC 9162's leaf index, from 0
            proof = merkle.inclusion_proof(store, index, cp.size)
            data.update(seq=args.inclusion, leaf_index=index,
                        leaf_hash=_b64(store.get(0, index)))
        else:
            proof = merkle.consistency_proof(store, args.consistency, cp.size)
            data.update(old_size=args.consistency)
    except (merkle.ProofError, KeyError) as e:
        raise CliError(f"no proof: {e}") from None
    data["proof"] = [_b64(h) for h in proof]
    emit(args, data, lambda: "\n".join(
        [f"{k}: {v}" for k, v in data.items() if k != "proof"] + ["proof:", *data["proof"]]))


def vkey_argument(value: str) -> str:
    """``--vkey``: the vkey itself, or a file holding it (what ``signerctl audit vkey``
    printed, saved). Raises CliError for a file that cannot be read."""
    if "+" in value:
        return value
    path = Path(value)
    if path.is_file():
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--vkey {value}: cannot read it: {e}") from None
    return value


def check_checkpoint(files: list[Path], checkpoint: Path, vkey: str) -> str:
    """Check that the lines of ``files`` are the leaves of the signed
    checkpoint ``checkpoint`` (verified with ``vkey``), using the tiles kept
    next to the last file for lines that are gone. Returns a one-line
    summary; raises CliError naming the first line that is not in the tree."""
    try:
        verifier = Verifier.from_vkey(vkey)
        note = Note.parse(checkpoint.read_bytes())
        if not note.verified_by(verifier):
            raise CliError(f"{checkpoint} is not signed by {verifier.name}")
        cp = Checkpoint.parse(note.text)
        base = int(json.loads((tree_dir(files[-1]) / "tree.json").read_text())["base"])
    except (OSError, ValueError, KeyError, NoteError) as e:
        raise CliError(f"checkpoint check: {getattr(e, 'strerror', None) or e}") from None
    store = TileFiles(tree_dir(files[-1])).store(cp.size)
    try:
        if merkle.root(store, cp.size) != cp.root:
            raise CliError(f"the tiles in {tree_dir(files[-1])} do not hash to the checkpoint's "
                           "root")
    except KeyError:
        raise CliError(f"tiles of size {cp.size} are missing in {tree_dir(files[-1])}") from None
    checked, last = 0, base
    for f in files:
        with _open_log(f) as fh:
            for raw in fh:
                line = raw.rstrip(b"\n")
                parsed = _parse(line)
                if not isinstance(parsed, tuple):
                    raise CliError(f"{f}: a line is not an audit record")
                seq = parsed[0]
                index = seq - base - 1
                last = max(last, seq)
                if 0 <= index < cp.size:
                    if store.get(0, index) != leaf_hash(line):
                        raise CliError(f"{f}: line seq {seq} is not the line checkpoint "
                                       f"{cp.origin} size {cp.size} holds")
                    checked += 1
    if last < base + cp.size:
        raise CliError(f"the files end at seq {last} but the checkpoint covers seq "
                       f"{base + cp.size}: lines were removed")
    return (f"checkpoint {cp.origin} size {cp.size}: signed by {verifier.name}; {checked} "
            "lines checked against its tree")


def register(audit: Any, common: argparse.ArgumentParser) -> None:
    """Add ``vkey`` and ``prove`` to the ``signerctl audit`` sub-parsers."""
    p = audit.add_parser("vkey", parents=[common],
                         help="print the audit log's checkpoint verifier key (signed-note vkey)")
    p.add_argument("log", help="the audit log file (its tree is <log>.tlog)")
    p.set_defaults(func=cmd_vkey)
    p = audit.add_parser("prove", parents=[common],
                         help="print an RFC 9162 proof against the last checkpoint")
    p.add_argument("log", help="the audit log file (its tree is <log>.tlog)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--inclusion", type=int, metavar="SEQ", help="the line with this seq")
    which.add_argument("--consistency", type=int, metavar="OLD",
                       help="from the tree of this size")
    p.set_defaults(func=cmd_prove)
