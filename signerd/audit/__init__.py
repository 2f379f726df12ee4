"""Hash-chained audit log: one JSON line per request, and a checker for it.

Log file
--------
Each line is one compact JSON object with sorted keys and only ASCII bytes
(``ensure_ascii``), so a value can never contain a raw newline. The caller
passes the request fields (``request_id identity peer transport operation
key_id gun role token payload_sha256 decision status latency_ms``);
:meth:`AuditLog.write` adds three more:

``time``  RFC 3339 UTC with milliseconds, ``2024-05-01T12:00:00.123Z``;
``seq``   1 for the first line of the chain, then +1 per line;
``prev``  hex SHA-256 of the previous line's exact bytes (without its
          newline); 64 zeros on the first line.

String values longer than :data:`MAX_VALUE_CHARS` are shortened to a prefix
plus their length and SHA-256, so a client cannot bloat the log through a
field it controls (such as a listing filter).

Head file
---------
A chain shows edits, deletions and reordering *inside* the file, but not
whole lines cut off its end: the shorter file is a valid chain too. So the
writer also keeps ``<log>.head``, one fixed-size line
``{"seq":N,"sha256":"<hash of line N>"}`` padded with spaces to
:data:`HEAD_SIZE` bytes. It is rewritten in place after every line with a
single ``pwrite`` at offset 0: one extra system call, no rename and no fsync,
which is cheap enough for every request. Because the head is written after
the line it names, a reader that reads the head first and the log second
never sees the head ahead of the log. :func:`verify` then requires the line
with the head's ``seq`` to exist and to hash to the head's value. A head that
*lags* the log (a crash between the two writes) is accepted.

Limits, precisely:

* The chain is not keyed. Whoever can write the log can also recompute a
  consistent chain, and whoever can write the directory can truncate the log
  and rewrite or delete the head. Tamper evidence against such an attacker
  needs an anchor kept elsewhere: the writer logs an ``audit checkpoint``
  (seq and hash) through the normal log stream when it opens, every
  ``checkpoint_every`` lines and on close, and ``verify(path,
  expect_last=...)`` checks the file ends with a given line hash.
* Without ``fsync=True`` a power loss can lose the end of the log while the
  head survives; ``verify`` then reports the tail as truncated, which is
  true: those lines are gone. With ``fsync=True`` the log is synced before the
  head is written, so the head can only lag.
* Such a power loss, or any removal of lines at the end, also stops the
  next start: :class:`AuditLog` refuses (``ConfigError``) to continue a log
  that is shorter than its head says, since continuing would overwrite the
  evidence. The operator runs ``signerctl audit verify``, then either moves
  both files away (a new chain) or deletes the head file to accept the loss.
* A missing head file is reported by ``verify`` but does not fail it; a
  malformed one does. At startup a lagging head is accepted unchecked: only
  the log's last line is read, never the whole file.

Writing
-------
One process writes a log: :class:`AuditLog` takes an exclusive ``flock`` and
refuses to start if another process holds it. Open it after any fork: a
forked child would share the lock but not the chain state, and each worker
process needs its own file. Writes are not fsynced unless ``fsync=True``. A
write that fails (disk full, file unwritable) raises
:class:`~signerd.errors.Unavailable` so the request fails closed, and the
chain does not advance; bytes of a partly written line are cut off again.
If they cannot be, the log refuses every later write until restart. If the
file is removed or renamed while open (rotation), the next write creates a
new file at the path and continues the chain in it (see Rotation); if the
new file cannot be created, that write raises ``Unavailable``.

The log's files (the log, its head file, a rotation's new file) are opened
with ``O_NOFOLLOW`` and checked with ``fstat``: a regular file owned by
signerd's user, still the one at the path once locked. A symbolic link, a
device (``/dev/full``), a FIFO or someone else's file there is refused: at
start with ``ConfigError``, while running as a failed write (the link is
never written through). ``AuditLog.failure`` says why the last write failed
until one succeeds, which readiness reports; ``AuditLog.probe`` writes an
``audit.resume`` line recording the gap once the file system has room.

Rotation
--------
:meth:`AuditLog.rotate` (the daemon calls it on SIGUSR1) and ``max_bytes``
(``[audit] max_bytes``: the file rotates once a line takes it to that size
or more; unset, never by size) close the current file, rename it to
``<file>.<UTC time>Z`` and start a new file at the path. The name is the
rotation's time to the second, ``audit.log.20261128T141503Z``; further
rotations in the same second (or a name already taken) add ``_001``,
``_002``, ... The names sort in chain order, so ``audit.log.2* audit.log``
lists a chain oldest first, and logrotate's ``dateext`` with ``dateformat
.%Y%m%dT%H%M%SZ`` makes the same shape (its ``maxage`` expires them and
``compress`` packs them, except the rare ``_NNN`` ones;
deploy/logrotate/signerd). The new file's first line is a rotation record,
chained like any other line::

    {"operation":"audit.rotate","previous_file":"audit.log.20261128T141503Z",
     "prev":"<SHA-256 of the old file's last line>","reason":"sigusr1","seq":N+1,...}

so ``seq`` and ``prev`` run on across files and :func:`verify_files` checks
the files as one chain. A file that starts with a rotation record also
verifies on its own: the result says which earlier file it continues.

A log renamed while signerd was stopped (an empty or missing file whose head
names a line) is found again at the next start: the newest sibling
``<file>.*`` that ends with the head's line; the new file then starts with a
rotation record naming it. If none does, the start is refused as for any
log shorter than its head.

The switch is atomic for readers of the path: the new file is written in
full as ``.<file>.next``, the old file gets its rotated name as a second
link, and ``.<file>.next`` is renamed over the path. A crash in between
leaves ``.<file>.next``; the next start renames it into place if the old
file already has its rotated name, else deletes it. The head file keeps its
name and goes on naming the chain's last line. A file renamed or removed by
another program (logrotate without ``copytruncate``) is noticed at the next
write or rotation; the new file at the path then starts with a rotation
record whose ``previous_file`` is null (its new name is unknown). A rotation
that fails (say, the directory is not writable) is logged and the log goes
on in the current file: rotating is housekeeping, the line is the evidence.

Transparency
------------
The chain shows a local edit but not a history rewritten whole, chain and
all. So the log is also an RFC 9162 Merkle tree (issue 25), published the
way Go's checksum database and Certificate Transparency publish theirs:

* Each line is a leaf: ``SHA-256(0x00 || line)`` over its bytes without the
  newline; leaf ``i`` is the line with ``seq = base + 1 + i``, where ``base``
  is the log's seq when the tree started (at a first start, when the log
  opened: see below). The tree runs on across rotated
  files; each log (each worker's) is its own tree with its own origin
  (``[audit] origin``, default ``<hostname>/signerd/<file name>``).
* The tree's hashes are kept as c2sp.org/tlog-tiles tiles in ``<log>.tlog/``
  (:mod:`signerd.audit._tree`), never the lines. Rotated files may be
  compressed and deleted by retention (deploy/logrotate/signerd): that is
  legitimate, and nothing here needs them, since proofs and the start
  check read tiles. Deleting or editing lines at or after the last
  checkpoint's line, or the tiles, ``tree.json`` or the checkpoint, is what
  an attack looks like, and stops the start.
* Every ``[audit] checkpoint_interval`` seconds (default 1) after new lines,
  the log is synced, the tiles of its size written and synced, and a
  checkpoint ``origin\nsize\nbase64(root)\n`` signed as a signed note by
  the checkpoint key, a key on a token that no caller can use: Ed25519
  (signed-note type 0x01) where a token can make one, else ECDSA P-256
  (type 0x02; :mod:`signerd.service._checkpointkey`,
  :mod:`signerd.tlog.note`). Sizes only grow: never two checkpoints of one
  size, so never two roots of one size (ECDSA signatures are randomized:
  what may never differ is the root, not the signature's bytes). The
  checkpoint is written to ``<log>.tlog/checkpoint`` and served at ``GET
  /checkpoint`` with the tiles at ``GET /tile/<L>/<N>[.p/<W>]`` on the
  metrics listener; entry bundles are not served (the lines stay private).
* A first start (no ``<log>.tlog`` yet) serves before its checkpoint key
  is chosen, since choosing reads the tokens' first listing (seconds at
  10,000 keys; issue 24). ``tree.json``, with the base, is written at the
  log's open; the tree of every line written from then is kept in memory,
  and started on disk (``vkey``, the empty tree's checkpoint, then the
  ``audit.tree_start`` record, which follows the lines served before it)
  once the key is known; ``/checkpoint`` answers 404 until then. A start
  that finds a ``tree.json`` with no checkpoint and no tiles (a start
  killed before its first checkpoint: nothing was signed) is not refused:
  it starts a new tree at the log's end, and its ``audit.tree_start`` line
  names the lines in no tree (``"unsigned": [first, last]``), since it
  cannot tell them from a rewrite. A start with witnesses,
  ``checkpoint_key``, or checkpoints asked for explicitly chooses before
  serving, as before.
* ``[[audit.witnesses]]`` get each checkpoint with its consistency proof
  (c2sp.org/tlog-witness, :mod:`signerd.audit._witness`); their verified
  cosignatures are served with it. A witness refusing a proof raises an
  alarm (error line, ``signerd_audit_witness_alarm``, /readyz 503).
* At start (:mod:`signerd.audit._treecheck`) the log must extend its last
  checkpoint: signature, frontier hashing to its root, the checkpoint's
  line in the log and the lines after it chained from it, and each witness
  must not hold a larger tree or refuse the proof. Otherwise the start is
  refused with one line; ``[audit] reset`` set to the hash that line names
  abandons the tree deliberately (kept aside, a new origin, an
  ``audit.tree_reset`` record). Deleting the whole ``<log>.tlog`` looks, on
  the host alone, like a first start (an ``audit.tree_start`` record with
  a later ``base``), and deleting its checkpoint and tiles like a first
  start stopped before its first checkpoint: only a witness, which holds
  the old size, can tell.

Modules
-------
One job each; this package re-exports the public names.

``_writer``    :class:`AuditLog`: writes lines, one or a group at a time,
               keeps the head current, fails closed.
``_line``      one line and the head file: encoding, the chain's links,
               parsing them back.
``_rotation``  rotated names, the switch to a new file, following a file
               renamed by another program, resuming at start
               (:func:`check_resumable`), finishing an interrupted rotation.
``_verify``    :func:`verify`, :func:`verify_files`, :func:`format_result`.
``_fs``        the file-system calls the writer and rotation share.
``_files``     the files a writer holds open: appending (a partly written
               line cut off again), head updates, closing.
``_tree``      the Merkle tree and its tiles; ``_treecheck`` the start check;
               ``_checkpoints`` signing and serving checkpoints;
               ``_witness`` pushing them to witnesses; ``_tail`` reading
               a chain's end; ``_tlogconfig`` the ``[audit]`` settings.
"""

from signerd.audit._checkpoints import Checkpointer, CheckpointKey, vkey_of
from signerd.audit._line import (
    HEAD_SIZE,
    MAX_LINE_BYTES,
    MAX_VALUE_CHARS,
    ROTATE_OPERATION,
    ZERO_HASH,
    head_path,
)
from signerd.audit._rotation import check_resumable, rotated_path
from signerd.audit._tlogconfig import TlogConfig, WitnessConfig
from signerd.audit._tree import AuditTree, TileFiles, tree_dir
from signerd.audit._verify import Problem, VerifyResult, format_result, verify, verify_files
from signerd.audit._writer import AuditLog

__all__ = [
    "HEAD_SIZE",
    "MAX_LINE_BYTES",
    "MAX_VALUE_CHARS",
    "ROTATE_OPERATION",
    "ZERO_HASH",
    "TileFiles",
    "TlogConfig",
    "WitnessConfig",
    "AuditLog",
    "AuditTree",
    "CheckpointKey",
    "Checkpointer",
    "Problem",
    "VerifyResult",
    "check_resumable",
    "format_result",
    "head_path",
    "rotated_path",
    "verify",
    "tree_dir",
    "verify_files",
    "vkey_of",
]
