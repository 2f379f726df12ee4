"""Reading the end of a chain: the lines from a given ``seq`` to the end,
across rotated files (newest first, compressed ones through gzip), reading
the current file backwards so that a start never reads a whole large log
(see Transparency in :mod:`signerd.audit`)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Final

from signerd.audit._line import _parse

_BLOCK: Final = 64 * 1024


def _seq_of(line: bytes) -> int | None:
    parsed = _parse(line)
    return parsed[0] if isinstance(parsed, tuple) else None


def _tail_of_file(path: Path, first: int) -> tuple[list[bytes], bool]:
    """The complete lines of ``path`` from the one with seq ``first`` on, and
    whether the file reaches back to it (False: it starts later). Reads
    backwards in blocks until a line at or before ``first`` is seen."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            lines = f.read().split(b"\n")
        lines = lines[:-1] if lines and lines[-1] == b"" else lines
        return _from(lines, first)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        blocks: list[bytes] = []
        while end > 0:
            start = max(0, end - _BLOCK)
            block = os.pread(fd, end - start, start)
            blocks.append(block)
            end = start
            # The first whole line of this block (it starts after a newline).
            cut = block.find(b"\n")
            stop = block.find(b"\n", cut + 1) if cut >= 0 else -1
            if stop >= 0:
                seq = _seq_of(block[cut + 1:stop])
                if seq is not None and seq <= first:
                    break
    finally:
        os.close(fd)
    parts = b"".join(reversed(blocks)).split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return _from(parts if end == 0 else parts[1:], first)


def _from(lines: list[bytes], first: int) -> tuple[list[bytes], bool]:
    for i, line in enumerate(lines):
        seq = _seq_of(line)
        if seq is not None and seq >= first:
            return lines[i:], seq == first
    return [], False


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the log ``path``, oldest first (their names sort
    in chain order; ``.gz`` ones included)."""
    try:
        names = [n for n in os.listdir(path.parent)
                 if n.startswith(path.name + ".2") and not n.endswith(".tmp")]
    except OSError:
        return []
    return [path.parent / n for n in sorted(names, key=lambda n: n.removesuffix(".gz"))]


def lines_from(path: Path, first: int) -> list[bytes] | None:
    """The lines of the chain of the log ``path`` from seq ``first`` to its
    end (without newlines), from the current file and as many rotated files
    before it as needed; None if no file holds seq ``first`` any more.
    Raises OSError."""
    files = [*rotated_files(path), path] if path.exists() else rotated_files(path)
    collected: list[bytes] = []
    for f in reversed(files):
        lines, reached = _tail_of_file(f, first)
        collected = lines + collected
        if reached:
            return collected
    return None
