"""The audit log as a Merkle tree (see Transparency in :mod:`signerd.audit`):
:class:`AuditTree` keeps the hashes of every line as c2sp.org/tlog-tiles
tiles in a directory next to the log, and in memory only the tiles not yet
full (at most 255 hashes per tile level: the tree's frontier).

Leaf ``i`` is the line with ``seq = base + 1 + i`` (``base``: the log's seq
when the tree was started; at a first start, when the log opened), hashed
as RFC 9162 ``SHA-256(0x00 || line)`` over its bytes without the newline.

On disk (``<log>.tlog/``)::

    tree.json     {"origin": ..., "base": N, "epoch": E}, written once
    checkpoint    the last signed checkpoint, with verified cosignatures
    vkey          the signed-note verifier key of ``origin``
    tile/L/N      full tiles, and partial tiles tile/L/N.p/W

Full tiles are written (unsynced) as they fill; :meth:`AuditTree.persist`
writes the partial tiles of a size and syncs everything, before a checkpoint
of that size is signed, so the tiles of the last checkpoint's size are
always on disk. Older partial tiles are removed only after the checkpoint is
written (:meth:`AuditTree.prune`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from signerd.audit._fs import _fsync_dir
from signerd.tlog import merkle
from signerd.tlog.merkle import leaf_hash, node_hash
from signerd.tlog.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    TileHashes,
    split_hashes,
    tile_path,
    tiles_for_size,
)

_TILE_BYTES: Final = TILE_WIDTH * merkle.HASH_SIZE


def tree_dir(log: Path) -> Path:
    """Where the tree of the log ``log`` lives: ``<log>.tlog``."""
    return log.with_name(log.name + ".tlog")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole (temporary file, fsync, rename, directory fsync).
    Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class TileFiles:
    """Tiles in a directory, read and written by their tlog-tiles path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, level: int, n: int, width: int = TILE_WIDTH) -> Path:
        """The file of tile ``(level, n)`` of ``width`` hashes."""
        return self.directory / tile_path(level, n, width)

    def read(self, level: int, n: int, width: int) -> list[bytes]:
        """At least ``width`` hashes of tile ``(level, n)``: the full tile, or
        the narrowest partial one that holds them. Raises KeyError."""
        full = self.path(level, n)
        with contextlib.suppress(FileNotFoundError):
            return split_hashes(full.read_bytes())
        if width < TILE_WIDTH:
            partials = full.with_name(full.name + ".p")
            with contextlib.suppress(OSError, ValueError):
                widths = sorted(int(p) for p in os.listdir(partials) if p.isdigit())
                for w in widths:
                    if w >= width:
                        return split_hashes((partials / str(w)).read_bytes())
        raise KeyError((level, n, width))

    def store(self, size: int) -> TileHashes:
        """The hashes of the tree of ``size`` leaves, as kept here."""
        return TileHashes(size, self.read)


class AuditTree:
    """The Merkle tree of one audit log; thread-safe. ``append`` is called
    under the log's lock with each committed line; ``persist`` and ``prune``
    by the checkpointer. Raises OSError from disk operations."""

    def __init__(self, directory: Path, base: int) -> None:
        self.directory = directory
        self.base = base
        self.files = TileFiles(directory)
        self._lock = threading.Lock()
        # _nodes[l]: the level-l hashes of the tile (of tile level l // 8) being filled
        self._nodes: list[list[bytes]] = [[]]
        self._count: list[int] = [0]  # hashes so far, per tile level
        # Full tiles filled since the last persist: written only then, after the
        # log is synced, so no tile on disk is ahead of the log's synced lines.
        self._full: dict[tuple[int, int], bytes] = {}

    @property
    def size(self) -> int:
        """Leaves in the tree."""
        return self._count[0]

    def restore(self, size: int) -> None:
        """Load the frontier of a tree of ``size`` leaves from its tiles.
        Raises KeyError if a tile it needs is missing, ValueError if malformed."""
        with self._lock:
            self._nodes, self._count = [[]], [0]
            level = 0
            while size >> (TILE_HEIGHT * level):
                self._grow(TILE_HEIGHT * level + TILE_HEIGHT)
                count = size >> (TILE_HEIGHT * level)
                self._count[level] = count
                width = count % TILE_WIDTH
                hashes = (self.files.read(level, count // TILE_WIDTH, width)[:width]
                          if width else [])
                base = TILE_HEIGHT * level
                self._nodes[base] = hashes
                for k in range(1, TILE_HEIGHT):
                    below = self._nodes[base + k - 1]
                    self._nodes[base + k] = [node_hash(below[i], below[i + 1])
                                             for i in range(0, len(below) - 1, 2)]
                level += 1

    def _grow(self, levels: int) -> None:
        while len(self._nodes) <= levels:
            self._nodes.append([])
        while len(self._count) <= levels // TILE_HEIGHT:
            self._count.append(0)

    def append(self, lines: Sequence[bytes]) -> None:
        """Add each line (without its newline) as the next leaf. A full tile
        is written as it fills; OSError there is raised after the leaf is in
        memory (the tile is rewritten by the next persist)."""
        with self._lock:
            for line in lines:
                self._add(0, leaf_hash(line))

    def _add(self, level: int, h: bytes) -> None:
        self._grow(level + TILE_HEIGHT)
        nodes = self._nodes[level]
        nodes.append(h)
        if level % TILE_HEIGHT == 0:
            self._count[level // TILE_HEIGHT] += 1
        if len(nodes) % 2 == 0:
            self._add(level + 1, node_hash(nodes[-2], nodes[-1]))
        if level % TILE_HEIGHT == 0 and len(nodes) == TILE_WIDTH:
            tl = level // TILE_HEIGHT
            self._full[(tl, self._count[tl] // TILE_WIDTH - 1)] = b"".join(nodes)
            for k in range(TILE_HEIGHT):
                self._nodes[level + k] = []

    def _read(self, level: int, n: int, width: int) -> list[bytes]:
        """Tile hashes from memory while the tile is being filled, else from disk."""
        if level < len(self._count) and self._count[level] // TILE_WIDTH == n:
            return list(self._nodes[TILE_HEIGHT * level])
        full = self._full.get((level, n))
        if full is not None:
            return split_hashes(full)
        return self.files.read(level, n, width)

    def hashes(self, size: int) -> TileHashes:
        """A HashStore of the tree's first ``size`` leaves (memory and tiles)."""
        return TileHashes(size, self._locked_read)

    def _locked_read(self, level: int, n: int, width: int) -> list[bytes]:
        with self._lock:
            return self._read(level, n, width)

    def root(self, size: int) -> bytes:
        """Root hash of the first ``size`` leaves."""
        return merkle.root(self.hashes(size), size)

    def persist(self, size: int) -> bytes:
        """Write the partial tiles of the tree of ``size`` leaves, sync every
        tile written since the last call, and return that tree's root."""
        partial = []
        with self._lock:
            done = {k: v for k, v in self._full.items()
                    if (k[1] + 1) * TILE_WIDTH <= size >> (TILE_HEIGHT * k[0])}
            for k in done:
                del self._full[k]
            for level, n, width in tiles_for_size(size):
                partial.append((self.files.path(level, n, width),
                                b"".join(self._read(level, n, width)[:width])))
        for (level, n), data in sorted(done.items()):
            write_atomic(self.files.path(level, n), data)
        for path, data in partial:
            if len(data) != _TILE_BYTES:
                write_atomic(path, data)
        return self.root(size)

    def leaves_on_disk(self, first: int) -> list[tuple[int, bytes]]:
        """Leaf hashes kept in level-0 tiles from leaf ``first`` on, as
        (index, hash): what a larger tree than a checkpoint's left behind."""
        out: list[tuple[int, bytes]] = []
        n = first // TILE_WIDTH
        while True:
            try:
                hashes = self.files.read(0, n, 1)
            except (KeyError, ValueError):
                return out
            for i, h in enumerate(hashes):
                if n * TILE_WIDTH + i >= first:
                    out.append((n * TILE_WIDTH + i, h))
            widest = self.files.path(0, n).with_name(self.files.path(0, n).name + ".p")
            with contextlib.suppress(OSError):
                for w in os.listdir(widest):
                    if w.isdigit() and int(w) > len(hashes):
                        hashes = split_hashes((widest / w).read_bytes())
                        out = [x for x in out if x[0] < n * TILE_WIDTH]
                        out += [(n * TILE_WIDTH + i, h) for i, h in enumerate(hashes)
                                if n * TILE_WIDTH + i >= first]
            if len(hashes) < TILE_WIDTH:
                return out
            n += 1

    def leaf(self, index: int) -> bytes:
        """Leaf hash ``index`` (below :attr:`size`)."""
        return self.hashes(self.size).get(0, index)

    def prune(self, size: int) -> None:
        """Remove partial tiles older than those of ``size`` (after its checkpoint)."""
        keep = {self.files.path(level, n, width) for level, n, width in tiles_for_size(size)}
        for path in _partials(self.directory / "tile"):
            if path not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()


def _partials(top: Path) -> Iterator[Path]:
    for dirpath, _dirnames, filenames in os.walk(top):
        if dirpath.endswith(".p"):
            for name in filenames:
                yield Path(dirpath) / name
