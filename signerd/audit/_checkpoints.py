"""Signed checkpoints of the audit tree (see Transparency in
:mod:`signerd.audit`): :class:`Checkpointer` checks the tree against its last
checkpoint when the log opens (:mod:`signerd.audit._treecheck`), adds every
line to it, and every ``interval`` seconds signs a checkpoint of the lines
already synced (c2sp.org/tlog-checkpoint, a c2sp.org/signed-note by the
checkpoint key), writes it, hands it to the witnesses and serves it with
their cosignatures and the tiles (c2sp.org/tlog-tiles)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signerd.audit._publish import tree_answer
from signerd.audit._tlogconfig import TlogConfig
from signerd.audit._tree import AuditTree, tree_dir, write_atomic
from signerd.audit._treecheck import TreeState, open_tree
from signerd.audit._witness import WitnessPusher
from signerd.errors import ConfigError
from signerd.tlog.note import (
    ECDSA_SHA256,
    ED25519,
    Checkpoint,
    Note,
    NoteError,
    Verifier,
    sign_note,
)

if TYPE_CHECKING:
    from signerd.audit._writer import AuditLog

log = logging.getLogger("signerd.audit")


@dataclass(frozen=True)
class CheckpointKey:
    """The checkpoint key and a callable that signs a message with it (on the
    token). ``sig_type`` is its signed-note type (c2sp.org/signed-note):
    Ed25519 (0x01; ``public_key`` the raw 32 bytes, ``sign`` returns 64
    bytes) or ECDSA P-256 (0x02; ``public_key`` the DER SubjectPublicKeyInfo,
    ``sign`` returns a DER signature of the message's SHA-256). ``key_id``
    names it in logs. ``failure`` says why the key cannot sign now (None
    when it can, or is not known yet): it is part of the daemon's
    readiness."""

    public_key: bytes
    sign: Callable[[bytes], bytes]
    key_id: str = ""
    sig_type: int = ED25519
    failure: Callable[[], str | None] = field(default=lambda: None)

    def __post_init__(self) -> None:
        if self.sig_type not in (ED25519, ECDSA_SHA256):
            raise ValueError(f"a checkpoint key is of type 0x01 or 0x02, not {self.sig_type}")

    def verifier(self, origin: str) -> Verifier:
        """The signed-note verifier of the log ``origin``."""
        return Verifier(origin, self.sig_type, self.public_key)

    def sign_note(self, text: str, origin: str) -> Note:
        """``text`` signed as a note by the log ``origin``. Raises NoteError,
        and whatever ``sign`` raises (SignerdError from a token)."""
        return sign_note(text, origin, self.public_key, self.sign, self.sig_type)


class Checkpointer:
    """The transparency half of one audit log. Pass it to
    :class:`~signerd.audit.AuditLog` as ``tree``; then :meth:`start` it with
    that log, and :meth:`stop` it before closing the log."""

    def __init__(self, key: CheckpointKey, config: TlogConfig,
                 metrics: Any = None) -> None:
        self.key = key
        self.config = config
        self._metrics = metrics
        self.state: TreeState | None = None
        self._lock = threading.Lock()  # one checkpoint at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._audit: AuditLog | None = None
        self._served = b""
        self.witnesses: list[WitnessPusher] = []

    # -- the AuditLog's tree sink ---------------------------------------------

    def open(self, path: Path, seq: int, last: str) -> None:
        """Check the tree of the log ``path`` (ending at ``seq``, whose last
        line hashes to ``last``) against its last checkpoint and the
        witnesses, and catch it up. Raises ConfigError: refuse to serve."""
        self.state = open_tree(path, seq, last, self.key, self.config)
        self._served = self.state.note.to_bytes()
        self.witnesses = [WitnessPusher(w, self.state.verifier, self.state.tree, self._metrics,
                                        self._cosigned)
                          for w in self.config.witnesses]
        self._sign_if_new(self.state.tree.size)  # the start's lines, already on disk
        for w in self.witnesses:
            refusal = w.check_at_start(self.state.note, self.state.checkpoint)
            if refusal is not None:
                raise ConfigError(f"audit log {path}: {refusal}; refusing to serve a history "
                                  "the witness cannot verify")

    def append(self, lines: Sequence[bytes]) -> None:
        """Add committed lines to the tree (called under the log's lock)."""
        assert self.state is not None
        self.state.tree.append(lines)

    # -- running --------------------------------------------------------------

    def start(self, audit: AuditLog) -> None:
        """Write the records the start owes the log (tree started or reset),
        then sign a checkpoint every interval while there are new lines."""
        assert self.state is not None
        self._audit = audit
        for record in self.state.records:
            audit.write(record)
        self.state.records.clear()
        for w in self.witnesses:
            w.start()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval):
            try:
                self.checkpoint()
            except Exception as e:  # keep checkpointing; signing goes on
                log.error("audit checkpoint failed", extra={"fields": {"error": str(e)}})

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint of every synced line, if there are new ones;
        returns it (None: nothing new). Raises OSError, SignerdError."""
        assert self.state is not None and self._audit is not None
        tree = self.state.tree
        if tree.size == self.state.checkpoint.size:
            return None
        synced = self._audit.sync() - tree.base
        return self._sign_if_new(min(synced, tree.size))

    def _sign_if_new(self, size: int) -> Checkpoint | None:
        state = self.state
        assert state is not None
        with self._lock:
            if size <= state.checkpoint.size:
                return None  # never two checkpoints of one size (nor a smaller one)
            root = state.tree.persist(size)
            cp = Checkpoint(state.origin, size, root)
            note = self.key.sign_note(cp.text(), state.origin)
            if not Note.parse(note.to_bytes()).verified_by(state.verifier):
                raise NoteError("the checkpoint key's signature does not verify")
            write_atomic(state.directory / "checkpoint", note.to_bytes())
            state.tree.prune(size)
            state.checkpoint, state.note = cp, note
            self._served = note.to_bytes()
            if self._metrics is not None:
                self._metrics.CHECKPOINTS.inc()
                self._metrics.CHECKPOINT_SIZE.set(size)
        for w in self.witnesses:
            w.submit(note, cp)
        return cp

    def _cosigned(self, cp: Checkpoint, lines: list[str]) -> None:
        """A witness cosigned ``cp`` (lines verified): serve them with it."""
        state = self.state
        assert state is not None
        with self._lock:
            if state.checkpoint != cp:
                return
            mine = state.note
            data = mine.to_bytes() + "".join(sorted(set(lines))).encode()
            note = Note.parse(data)
            write_atomic(state.directory / "checkpoint", note.to_bytes())
            state.note = note
            self._served = note.to_bytes()

    def stop(self) -> None:
        """A last checkpoint of everything written, then stop. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for w in self.witnesses:
            w.stop()
        if self._audit is not None:
            try:
                self.checkpoint()
            except Exception as e:
                log.error("final audit checkpoint failed", extra={"fields": {"error": str(e)}})

    # -- publishing (c2sp.org/tlog-tiles) -------------------------------------

    def alarms(self) -> list[str]:
        """Witnesses that refused this log's proof or checkpoint now."""
        return [w.config.name for w in self.witnesses if w.alarm]

    def serve(self, path: str) -> tuple[int, bytes, str] | None:
        """The answer to ``GET path``: ``/checkpoint``, ``/tile/...`` (within
        the latest checkpoint's tree); None for a path that is not ours."""
        state = self.state
        if state is None:
            return None
        return tree_answer(self._served, state.tree.files, path)


def vkey_of(log_path: Path) -> str:
    """The verifier key a running log published in its tree directory.
    Raises ConfigError if it has none."""
    try:
        return (tree_dir(log_path) / "vkey").read_text().strip()
    except OSError as e:
        raise ConfigError(f"{tree_dir(log_path)}/vkey: {e.strerror}: is this an audit log "
                          "with checkpoints?") from None


__all__ = ["AuditTree", "CheckpointKey", "Checkpointer", "vkey_of"]
