"""The start check of the audit tree (see Transparency in :mod:`signerd.audit`):
does the log on disk extend what its last checkpoint signed?

Without rehashing the log: the checkpoint's signature is checked with the
checkpoint key; the tree's frontier is read from the partial tiles of the
checkpoint's size and must hash to its root; the line the checkpoint ends
with must be in the log and hash to the frontier's last leaf; the lines
after it must chain from it, and are added to the tree. Everything before
that line is bound to it by the hash chain (edit one line and recompute the
chain, and that line changes too).

A start is refused (ConfigError, one line saying why) when the checkpoint
is missing or not signed by the key, tiles are missing or do not match it,
the log ends before it, or its last line differs. ``[audit] reset`` set to
the SHA-256 the refusal names abandons the tree (moved aside, not deleted)
and starts a new one with a new origin, with an ``audit.tree_reset`` record.
A new tree writes ``tree.json`` first and its first checkpoint last; a
``tree.json`` with neither a checkpoint nor tiles is a start stopped in
between (nothing was signed): the next start starts a new tree at the log's
end, and its ``audit.tree_start`` line names the lines in no tree
(``unsigned``: first and last seq), which it cannot tell from a rewrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from signerd.audit._line import _parse
from signerd.audit._tail import lines_from, rotated_files
from signerd.audit._tlogconfig import TlogConfig
from signerd.audit._tree import AuditTree, tree_dir, write_atomic
from signerd.errors import ConfigError
from signerd.tlog import merkle
from signerd.tlog.merkle import EMPTY_ROOT, leaf_hash
from signerd.tlog.note import Checkpoint, Note, NoteError, Verifier

if TYPE_CHECKING:
    from signerd.audit._checkpoints import CheckpointKey

log = logging.getLogger("signerd.audit")

START_OPERATION: Final = "audit.tree_start"
# How a start line looks in the log's canonical JSON (sorted keys, no spaces): a
# caller's value cannot hold it, since its quotes would be escaped.
_START_MARK: Final = b'"operation":"' + START_OPERATION.encode() + b'"'


@dataclass
class TreeState:
    """An open tree: where it lives, its origin and verifier, the last
    checkpoint (and its note), and records the log owes (start, reset)."""

    directory: Path
    origin: str
    verifier: Verifier
    tree: AuditTree
    checkpoint: Checkpoint
    note: Note
    records: list[dict[str, Any]] = field(default_factory=list)


class _Refused(Exception):
    pass


def default_origin(log_path: Path) -> str:
    """``<hostname>/signerd/<log file name>``: one origin per log (each worker's too)."""
    return f"{socket.gethostname()}/signerd/{log_path.name}"


def open_tree(path: Path, seq: int, last: str, key: CheckpointKey,
              config: TlogConfig) -> TreeState:
    """Open (or start) the tree of the log ``path``, which ends at ``seq``
    with a line hashing to ``last``. Raises ConfigError to refuse."""
    directory = tree_dir(path)
    if directory.is_symlink():  # the log's own files are never followed either
        raise ConfigError(f"audit log {path}: its tree {directory} is a symbolic link; "
                          "refusing to write through it")
    try:
        _sync_log(path)
        if not (directory / "tree.json").exists():
            if (directory / "checkpoint").exists() or (directory / "tile").exists():
                raise _Refused(f"{directory}/tree.json is missing but the tree's checkpoint "
                               "or tiles are there")
            return _start(path, directory, seq, key, config, 0, None)
        return _check(path, directory, seq, last, key, config)
    except _Refused as e:
        abandon = _abandon_hash(directory)
        if config.reset is not None and config.reset == abandon:
            return _reset(path, directory, seq, key, config, str(e))
        raise ConfigError(f"audit log {path}: {e}; refusing to serve a history that does not "
                          f"extend its checkpoint (to abandon this tree deliberately, set "
                          f"[audit] reset = \"{abandon}\")") from None
    except OSError as e:
        raise ConfigError(f"audit log {path}: tree {directory}: {e.strerror or e}") from None


def reserve_tree(path: Path, seq: int, config: TlogConfig) -> bytes:
    """Write the ``tree.json`` of a first start that serves before its key
    is chosen (the log ends at ``seq``: the tree's base), so that a start
    after a crash in between is not refused, and names the lines served
    meanwhile as in no tree (see :func:`_check`).
    Returns what it wrote, for :func:`start_tree`. Raises OSError."""
    directory = tree_dir(path)
    directory.mkdir(mode=0o755)  # FileExistsError: the caller saw no tree here
    data = _tree_json(_origin(path, config, 0), seq, 0)
    write_atomic(directory / "tree.json", data)
    return data


def unreserve_tree(path: Path, reserved: bytes) -> None:
    """Remove what :func:`reserve_tree` wrote, if nothing else was written
    there since (a first start that turned checkpoints off: the next start
    must not find a tree to keep). Best effort."""
    directory = tree_dir(path)
    with contextlib.suppress(OSError):
        if (os.listdir(directory) == ["tree.json"]
                and (directory / "tree.json").read_bytes() == reserved):
            (directory / "tree.json").unlink()
            directory.rmdir()


def start_tree(path: Path, tree: AuditTree, reserved: bytes, key: CheckpointKey,
               config: TlogConfig) -> TreeState:
    """Start on disk the tree of the log ``path`` that a first start began
    in memory before its key was chosen: ``tree`` (its ``base`` the log's
    seq at open) holds every line written since, and ``reserved`` is the
    ``tree.json`` :func:`reserve_tree` wrote. Raises ConfigError if another
    tree took its place meanwhile; OSError (say, a full disk) and the key's
    SignerdError are worth another try."""
    directory = tree_dir(path)
    if directory.is_symlink():  # replaced while the key was chosen
        raise ConfigError(f"audit log {path}: its tree {directory} became a symbolic link "
                          "while the daemon started; refusing to write through it")
    try:
        same = (directory / "tree.json").read_bytes() == reserved
    except FileNotFoundError:
        same = False
    if not same or (directory / "tile").exists():
        raise ConfigError(f"audit log {path}: another tree took the place of {directory} "
                          "while the daemon started its own; restart it to check that one")
    return _new_tree(path, directory, _origin(path, config, 0), tree.base, 0, key, None, tree)


def _sync_log(path: Path) -> None:
    """Lines on disk from the last run are about to be checkpointed: sync them."""
    for f in (path, *rotated_files(path)[-1:]):
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _abandon_hash(directory: Path) -> str:
    for name in ("checkpoint", "tree.json"):
        try:
            return hashlib.sha256((directory / name).read_bytes()).hexdigest()
        except OSError:
            continue
    return hashlib.sha256(str(directory).encode()).hexdigest()


def _tree_json(origin: str, base: int, epoch: int) -> bytes:
    return json.dumps({"origin": origin, "base": base, "epoch": epoch},
                      sort_keys=True).encode() + b"\n"


def _origin(path: Path, config: TlogConfig, epoch: int) -> str:
    """The origin of the log ``path``'s tree of ``epoch`` (0, then +1 per reset)."""
    origin = config.origin or default_origin(path)
    return f"{origin}/reset{epoch}" if epoch else origin


def _start(path: Path, directory: Path, seq: int, key: CheckpointKey, config: TlogConfig,
           epoch: int, reason: str | None) -> TreeState:
    return _new_tree(path, directory, _origin(path, config, epoch), seq, epoch, key, reason,
                     None)


def _new_tree(path: Path, directory: Path, origin: str, seq: int, epoch: int,
              key: CheckpointKey, reason: str | None, tree: AuditTree | None) -> TreeState:
    """A new tree of ``origin`` from base ``seq``: ``tree.json`` first, then
    the verifier key and the empty tree's checkpoint. A crash in between
    leaves a ``tree.json`` with no checkpoint and no tiles, from which the
    next start starts anew (:func:`_check`) rather than refuses."""
    directory.mkdir(mode=0o755, exist_ok=True)
    verifier = key.verifier(origin)
    cp = Checkpoint(origin, 0, EMPTY_ROOT)
    note = key.sign_note(cp.text(), origin)
    write_atomic(directory / "tree.json", _tree_json(origin, seq, epoch))
    write_atomic(directory / "vkey", (verifier.vkey() + "\n").encode())
    write_atomic(directory / "checkpoint", note.to_bytes())
    record = _start_record(origin, seq, verifier, reason)
    # A first start is ordinary (info); an abandoned tree is worth a warning.
    log.log(logging.WARNING if reason else logging.INFO,
            "audit tree reset: the old tree was abandoned" if reason else "audit tree started",
            extra={"fields": {"file": str(path), "origin": origin, "base": seq}})
    if tree is None:
        tree = AuditTree(directory, seq)
    return TreeState(directory, origin, verifier, tree, cp, note, [record])


def _start_record(origin: str, base: int, verifier: Verifier,
                  reason: str | None) -> dict[str, Any]:
    """The log line that records a tree's start (or reset)."""
    # The daemon's own act: its identity is "signerd", as no caller's can be.
    record: dict[str, Any] = {"operation": START_OPERATION, "identity": "signerd",
                              "origin": origin, "base": base, "vkey": verifier.vkey()}
    if reason is not None:
        record.update(operation="audit.tree_reset", reason=reason)
    return record


def _reset(path: Path, directory: Path, seq: int, key: CheckpointKey, config: TlogConfig,
           why: str) -> TreeState:
    try:
        epoch = int(json.loads((directory / "tree.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        epoch = 1
    aside = directory.with_name(
        f"{directory.name}.abandoned-{datetime.now(UTC):%Y%m%dT%H%M%S}Z")
    os.rename(directory, aside)
    return _start(path, directory, seq, key, config, epoch,
                  f"{why}; the old tree is kept in {aside.name}")


def _read_tree_json(directory: Path) -> tuple[str, int, int]:
    """(origin, base, epoch) of ``tree.json``; _Refused if it is not exactly
    that: a non-empty one-line origin and two non-negative integers."""
    try:
        state = json.loads((directory / "tree.json").read_text())
        origin, base, epoch = state["origin"], state["base"], state["epoch"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise _Refused(f"{directory}/tree.json is malformed ({e})") from None
    if not (isinstance(origin, str) and origin and "\n" not in origin
            and type(base) is int and type(epoch) is int and base >= 0 and epoch >= 0):
        raise _Refused(f"{directory}/tree.json is malformed (origin, base or epoch)")
    return origin, base, epoch


def _check(path: Path, directory: Path, seq: int, last: str, key: CheckpointKey,
           config: TlogConfig) -> TreeState:
    origin, base, epoch = _read_tree_json(directory)
    if not (directory / "checkpoint").exists() and not (directory / "tile").exists():
        # A start that stopped (a crash, a kill) before its first checkpoint: nothing
        # was signed, so nothing is contradicted. Its lines cannot be told from lines
        # someone rewrote since (with the checkpoint and tiles deleted, this is what
        # such a rewrite looks like), so none of them is signed now: a new tree starts
        # at the log's end, as a first start's does, and its start line names them.
        if seq < base:
            raise _Refused(f"the log ends at seq {seq} but its tree starts at seq {base}: "
                           "lines were removed")
        started = _start(path, directory, seq, key, config, epoch, None)
        if seq > base:
            started.records[0]["unsigned"] = [base + 1, seq]
            log.warning("audit lines in no tree: a start stopped before its first checkpoint",
                        extra={"fields": {"file": str(path), "first": base + 1, "last": seq}})
        return started
    try:
        verifier = key.verifier(origin)
    except NoteError as e:
        raise _Refused(f"{directory}/tree.json is malformed (origin: {e})") from None
    try:
        note = Note.parse((directory / "checkpoint").read_bytes())
        if not note.verified_by(verifier):
            raise _Refused(f"{directory}/checkpoint is not signed by this log's checkpoint "
                           f"key ({verifier.vkey()})")
        cp = Checkpoint.parse(note.text)
    except FileNotFoundError:
        raise _Refused(f"{directory}/checkpoint is missing (deleted?)") from None
    except NoteError as e:
        raise _Refused(f"{directory}/checkpoint: {e}") from None
    if cp.origin != origin:
        raise _Refused(f"the checkpoint's origin {cp.origin!r} is not the tree's {origin!r}")
    tree = AuditTree(directory, base)
    try:
        tree.restore(cp.size)
    except (KeyError, ValueError):
        raise _Refused(f"the tiles of the checkpoint's size {cp.size} are missing or "
                       "malformed") from None
    if tree.root(cp.size) != cp.root:
        raise _Refused(f"the tiles do not hash to the checkpoint's root (size {cp.size})")
    end = base + cp.size  # seq of the checkpoint's last line
    if seq < end:
        raise _Refused(f"the log ends at seq {seq} but its checkpoint covers seq {end}: "
                       "lines were removed")
    added = _catch_up(path, tree, cp.size, end, seq, last)
    owed = []
    if cp.size == 0 and not any(_START_MARK in line for line in added):
        # Stopped after the empty tree's checkpoint but before the start's own
        # line (it follows the lines served while the key was chosen): write it now.
        owed = [_start_record(origin, base, verifier, None)]
    for index, h in tree.leaves_on_disk(cp.size):
        # Tiles of a larger tree than the checkpoint's (a crash between the
        # tiles and the checkpoint, or a checkpoint rolled back): the log
        # must still hold those very lines.
        if index >= tree.size or tree.leaf(index) != h:
            raise _Refused(f"the tiles hold line seq {base + index + 1} of a larger tree than "
                           f"the checkpoint's (size {cp.size}) and the log does not match "
                           "them: the checkpoint was rolled back and the log rewritten")
    return TreeState(directory, origin, verifier, tree, cp, note, owed)


def _catch_up(path: Path, tree: AuditTree, size: int, end: int, seq: int,
              last: str) -> list[bytes]:
    """Check the checkpoint's last line (seq ``end``) and add the lines after
    it; returns the lines added."""
    if seq == end and size == 0:
        return []
    first = end if size else end + 1
    lines = lines_from(path, first)
    if lines is None or not lines:
        raise _Refused(f"line seq {first} (the checkpoint's last) is in no log file")
    if size:
        proof_store = tree.hashes(size)
        try:
            merkle.verify_inclusion(leaf_hash(lines[0]), size - 1, size,
                                    merkle.inclusion_proof(proof_store, size - 1, size),
                                    tree.root(size))
        except merkle.ProofError:
            raise _Refused(f"line seq {end} is not the line the checkpoint signed: the log "
                           "was rewritten") from None
        prev, rest = hashlib.sha256(lines[0]).hexdigest(), lines[1:]
    else:
        prev, rest = None, lines
    want = first + (1 if size else 0)
    for line in rest:
        parsed = _parse(line)
        if not isinstance(parsed, tuple) or parsed[0] != want or (
                prev is not None and parsed[1] != prev):
            raise _Refused(f"line seq {want} does not continue the chain after the checkpoint")
        prev, want = hashlib.sha256(line).hexdigest(), want + 1
    if want - 1 != seq or (prev is not None and prev != last):
        raise _Refused(f"the lines after the checkpoint end at seq {want - 1}, not at the "
                       f"log's end (seq {seq})")
    tree.append(rest)
    return rest
