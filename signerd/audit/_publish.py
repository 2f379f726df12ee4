"""Publishing audit trees over HTTP, the c2sp.org/tlog-tiles way: ``GET
/checkpoint`` (the signed note with the witnesses' cosignatures) and ``GET
/tile/<L>/<N>[.p/<W>]`` (hash tiles within the latest checkpoint's tree).

One process serves its own log's tree from memory
(:meth:`signerd.audit.Checkpointer.serve`). With ``[server] workers = N``
every worker's log is a tree of its own, with its own origin, and the
supervisor, which holds the metrics listener, serves them all from what the
workers keep on disk (:class:`WorkerTrees`): worker ``i``'s at ``/w<i>/``,
the prefix of its log file (``audit.log.w<i>``). The ``checkpoint`` file of
a tree directory always holds the last note the worker signed, with the
cosignatures it verified (written atomically), and every tile that note
covers is on disk before the note is (:meth:`AuditTree.persist`).
"""

from __future__ import annotations

from pathlib import Path

from signerd.audit._tree import TileFiles, tree_dir
from signerd.tlog.note import Checkpoint, Note, NoteError
from signerd.tlog.tiles import TILE_HEIGHT, TILE_WIDTH, parse_tile_path

Answer = tuple[int, bytes, str]  # (HTTP status, body, Content-Type)
NOT_FOUND: Answer = (404, b"not found\n", "text/plain")


def tree_answer(note: bytes, files: TileFiles, path: str) -> Answer | None:
    """The answer to ``GET path`` for the tree whose latest signed note is
    ``note`` and whose tiles are ``files``: the note for ``/checkpoint``, a
    tile (only within the note's tree size) for ``/tile/...``; None for a
    path that is neither. Raises nothing: an unreadable tile is 404."""
    if path == "/checkpoint":
        return 200, note, "text/plain; charset=utf-8"
    if not path.startswith("/tile/"):
        return None
    parsed = parse_tile_path(path[1:])
    if parsed is None:
        return NOT_FOUND
    level, n, width = parsed
    try:
        size = Checkpoint.parse(Note.parse(note).text).size
    except (NoteError, ValueError):
        return NOT_FOUND
    if n * TILE_WIDTH + width > size >> (TILE_HEIGHT * level):
        return NOT_FOUND
    try:
        hashes = files.read(level, n, width)[:width]
    except (KeyError, OSError, ValueError):  # a partial tile pruned meanwhile: ask again
        return NOT_FOUND
    return 200, b"".join(hashes), "application/octet-stream"


class WorkerTrees:
    """The supervisor's publisher of its workers' trees: ``logs`` maps a URL
    prefix (``w1``, ``w2``...) to that worker's audit log file."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self._dirs = {prefix: tree_dir(path) for prefix, path in logs.items()}

    def serve(self, path: str) -> Answer | None:
        """The answer to ``GET path`` (``/w<i>/checkpoint``,
        ``/w<i>/tile/...``); 404 for a worker whose log has no checkpoint
        yet (or checkpoints off); None for a path that is not a worker's."""
        prefix, slash, rest = path[1:].partition("/")
        directory = self._dirs.get(prefix)
        if directory is None or not slash:
            return None
        try:
            note = (directory / "checkpoint").read_bytes()
        except OSError:
            return NOT_FOUND
        return tree_answer(note, TileFiles(directory), "/" + rest)


__all__ = ["NOT_FOUND", "Answer", "WorkerTrees", "tree_answer"]
