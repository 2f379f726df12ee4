"""Signed checkpoints of the audit tree (see Transparency in
:mod:`signerd.audit`): :class:`Checkpointer` checks the tree against its last
checkpoint when the log opens (:mod:`signerd.audit._treecheck`), adds every
line to it, and every ``interval`` seconds signs a checkpoint of the lines
already synced (c2sp.org/tlog-checkpoint, a c2sp.org/signed-note by the
checkpoint key), writes it, hands it to the witnesses and serves it with
their cosignatures and the tiles (c2sp.org/tlog-tiles)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from signerd.audit._publish import NOT_FOUND, tree_answer
from signerd.audit._tlogconfig import TlogConfig
from signerd.audit._tree import AuditTree, tree_dir, write_atomic
from signerd.audit._treecheck import (
    TreeState,
    open_tree,
    reserve_tree,
    start_tree,
    unreserve_tree,
)
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

# Seconds a first start's tree may keep failing to start (a token away, a full
# disk: retried every interval) before readiness says so. The token's and the
# log's own readiness report those causes at once.
TREE_START_GRACE: Final = 30.0


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
    that log, and :meth:`stop` it before closing the log.

    ``key`` is the checkpoint key; or it is None and ``choose`` finds or
    makes it (returning None: checkpoints off), for a log that has no tree
    yet. Then the log serves at once: its ``tree.json``, with the base, is
    written at open (:func:`reserve_tree`), the tree of every line written
    from then is kept in memory, and it is started on disk (its ``vkey``
    and first checkpoint, then the ``audit.tree_start`` record) in the
    background once ``choose`` returns. A start after a crash in between is
    not refused, and names the lines served meanwhile as in no tree
    (:mod:`signerd.audit._treecheck`). Choosing lists the keys already on
    the tokens, seconds at 10,000 keys, and issue 24 asks a daemon to serve
    within 0.5 s of its module's ``C_Initialize``."""

    def __init__(self, key: CheckpointKey | None, config: TlogConfig, metrics: Any = None,
                 choose: Callable[[], CheckpointKey | None] | None = None) -> None:
        if key is None and choose is None:
            raise ValueError("a Checkpointer needs its key or a way to choose it")
        if key is None and config.witnesses:
            raise ValueError("a log with witnesses checks them before serving: pass its key")
        self.key = key
        self.config = config
        self._metrics = metrics
        self._choose = choose
        self.state: TreeState | None = None
        # The tree lines are added to: the state's, or the first start's before it
        # has a key (None: checkpoints turned off, lines are not kept).
        self._tree: AuditTree | None = None
        self._path: Path | None = None
        self._reserved = b""  # the tree.json a first start wrote at open (reserve_tree)
        self._failure: str | None = None  # why the first start's tree never will be
        self._retrying: tuple[float, str] | None = None  # since when, and why, it is not yet
        self._settled = threading.Event()  # the tree is started, or never will be
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
        witnesses, and catch it up. Raises ConfigError: refuse to serve.
        A log with no tree and no key yet only starts keeping the tree of
        the lines written from now (see the class)."""
        self._path = path
        if self.key is None:
            if os.path.lexists(tree_dir(path)):  # the caller chose this path for a log without
                raise ConfigError(f"audit log {path}: its tree {tree_dir(path)} appeared "
                                  "while the daemon started; start again")
            self._reserved = reserve_tree(path, seq, self.config)  # OSError: a failed open
            self._tree = AuditTree(tree_dir(path), seq)
            return
        self.state = open_tree(path, seq, last, self.key, self.config)
        self._tree = self.state.tree
        self._settled.set()
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
        tree = self._tree
        if tree is not None:
            tree.append(lines)

    def failure(self) -> str | None:
        """Why checkpoints cannot be signed now (None: they can, or it is not
        known yet): the key's failure, or the first start's. Part of the
        daemon's readiness. A first start's tree that is retried is
        reported once it has failed for :data:`TREE_START_GRACE` seconds."""
        if self.key is not None:
            return self.key.failure()
        retrying = self._retrying
        if (self._failure is None and retrying is not None
                and time.monotonic() - retrying[0] >= TREE_START_GRACE):
            return retrying[1]
        return self._failure

    # -- running --------------------------------------------------------------

    def start(self, audit: AuditLog) -> None:
        """Write the records the start owes the log (tree started or reset),
        then sign a checkpoint every interval while there are new lines.
        A first start without its key chooses it first, in the background."""
        self._audit = audit
        if self.state is not None:
            for record in self.state.records:
                audit.write(record)
            self.state.records.clear()
        for w in self.witnesses:
            w.start()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints",
                                        daemon=True)
        self._thread.start()

    def wait_started(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the tree to be started (at once
        unless a first start is choosing its key); True if it is."""
        self._settled.wait(timeout)
        return self.state is not None

    def _run(self) -> None:
        if self.state is None:
            started = self._begin()
            self._settled.set()
            if not started:
                return
        while not self._stop.wait(self.config.interval):
            try:
                self.checkpoint()
            except Exception as e:  # keep checkpointing; signing goes on
                log.error("audit checkpoint failed", extra={"fields": {"error": str(e)}})

    def _begin(self) -> bool:
        """The first start's tree, begun after serving: choose the key, start
        the tree on disk with the lines kept so far, write the start's
        record. True once started (also when the daemon is stopping: its
        lines are then in a tree the final checkpoint signs). A ConfigError
        (no key can be chosen, or another tree appeared) is final, and
        readiness says so; any other error is retried every interval."""
        assert self._choose is not None and self._path is not None and self._audit is not None
        key: CheckpointKey | None = None
        while True:
            try:
                if key is None:  # chosen once: a retry only writes the tree again
                    key = self._choose()
                    if key is None:  # checkpoints off (the chooser said why)
                        self._tree = None
                        unreserve_tree(self._path, self._reserved)
                        return False
                state = start_tree(self._path, self._tree_kept(), self._reserved, key,
                                   self.config)
                break
            except ConfigError as e:
                self._give_up(str(e))
                return False
            except Exception as e:  # a token away, a full disk: try again
                why = f"the audit tree has not started: {e}"
                if self._retrying is None:
                    log.warning("audit tree not started yet; retrying",
                                extra={"fields": {"error": str(e)}})
                self._retrying = (self._retrying or (time.monotonic(), why))[0], why
                if self._stop.wait(self.config.interval):
                    return False
        self.key, self._retrying = key, None
        self._served = state.note.to_bytes()
        self.state = state
        try:
            for record in state.records:
                self._audit.write(record)
        except Exception as e:  # the tree is kept; the record is what is missing
            log.error("the audit.tree_start record was not written",
                      extra={"fields": {"error": str(e)}})
        state.records.clear()
        return True

    def _tree_kept(self) -> AuditTree:
        tree = self._tree
        assert tree is not None
        return tree

    def _give_up(self, why: str) -> None:
        self._failure = why
        self._tree = None  # the lines would be kept in memory for a tree that never starts
        log.error("audit checkpoints will fail", extra={"fields": {"error": why}})

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint of every synced line, if there are new ones;
        returns it (None: nothing new, or no tree yet). Raises OSError,
        SignerdError."""
        assert self._audit is not None
        if self.state is None:
            return None
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
            assert self.key is not None
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
        if state is None:  # a first start choosing its key, or checkpoints off
            return NOT_FOUND if path == "/checkpoint" or path.startswith("/tile/") else None
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
