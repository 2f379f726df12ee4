"""c2sp.org/tlog-tiles: how a log's hashes are cut into tiles and named.

A tile holds up to 256 consecutive hashes of one tree level: tile level ``L``
holds Merkle level ``8 * L`` (level 0 is the leaf hashes), tile ``N`` its
hashes ``[N * 256, N * 256 + W)``. A full tile (W = 256) is served at
``tile/<L>/<N>``, a partial one at ``tile/<L>/<N>.p/<W>``, as the W hashes
concatenated (32 bytes each). ``N`` is written as 3-digit path elements,
every one but the last prefixed with ``x``: 1234067 -> ``x001/x234/067``
(c2sp.org/tlog-tiles, "Merkle Tree" and "tiles" sections).

Pure functions over numbers and paths: no I/O. :class:`TileHashes` turns a
way of reading tiles into a :class:`~signerd.tlog.merkle.HashStore`, so the
proofs of :mod:`signerd.tlog.merkle` run over tiles a log has kept or served.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from signerd.tlog.merkle import HASH_SIZE, node_hash

TILE_HEIGHT: Final = 8
TILE_WIDTH: Final = 1 << TILE_HEIGHT  # 256 hashes
_PATH_RE: Final = re.compile(r"tile/(\d+)/((?:x\d{3}/)*\d{3})(?:\.p/(\d{1,3}))?")


def index_path(n: int) -> str:
    """``N`` as tlog-tiles path elements: 5 -> ``005``, 1234067 -> ``x001/x234/067``."""
    if n < 0:
        raise ValueError(f"a tile index is not negative: {n}")
    groups = []
    while True:
        groups.append(f"{n % 1000:03d}")
        n //= 1000
        if n == 0:
            break
    groups.reverse()
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def tile_path(level: int, n: int, width: int = TILE_WIDTH) -> str:
    """``tile/<L>/<N>`` for a full tile, ``tile/<L>/<N>.p/<W>`` for a partial one."""
    if not 0 < width <= TILE_WIDTH:
        raise ValueError(f"a tile holds 1 to {TILE_WIDTH} hashes, not {width}")
    base = f"tile/{level}/{index_path(n)}"
    return base if width == TILE_WIDTH else f"{base}.p/{width}"


def parse_tile_path(path: str) -> tuple[int, int, int] | None:
    """``(level, index, width)`` of a tile path, or None for anything else
    (entry bundles, ``tile/entries/...``, are not tiles). A path must be in the
    canonical form :func:`tile_path` writes: no leading zeros beyond the
    3-digit groups, no ``x000`` group, a width of 1 to 255."""
    m = _PATH_RE.fullmatch(path)
    if m is None:
        return None
    level_text, index_text, width_text = m.groups()
    if level_text != str(int(level_text)) or int(level_text) > 63:
        return None
    index = int(index_text.replace("x", "").replace("/", ""))
    if index_path(index) != index_text:
        return None
    if width_text is None:
        return int(level_text), index, TILE_WIDTH
    width = int(width_text)
    if width_text != str(width) or not 0 < width < TILE_WIDTH:
        return None
    return int(level_text), index, width


def tiles_for_size(size: int) -> list[tuple[int, int, int]]:
    """The tiles of a tree of ``size`` leaves that are partial (the right
    edge), as ``(level, index, width)``; full tiles below them are implied."""
    out = []
    level = 0
    while True:
        count = size >> (TILE_HEIGHT * level)  # hashes at this tile level
        if count == 0:
            break
        if count % TILE_WIDTH:
            out.append((level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
    return out


def split_hashes(data: bytes) -> list[bytes]:
    """A tile's bytes as its hashes; ValueError unless a whole number of 32-byte hashes."""
    if len(data) % HASH_SIZE or len(data) > TILE_WIDTH * HASH_SIZE:
        raise ValueError(f"a tile is up to {TILE_WIDTH} hashes of {HASH_SIZE} bytes, "
                         f"not {len(data)} bytes")
    return [data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def fold(hashes: list[bytes]) -> bytes:
    """The root of a complete subtree whose level-0 hashes (relative to it) are
    ``hashes``, a power of two of them."""
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


class TileHashes:
    """A :class:`~signerd.tlog.merkle.HashStore` over the tiles of a tree of
    ``size`` leaves: ``read(level, index, width)`` returns a tile's hashes
    (the full tile, or the partial one of that width, or a longer one: only
    the first ``width`` are used) and raises KeyError if it has none.

    The hash of complete subtree ``(l, i)`` with ``l = 8 * L + k`` is the
    fold of ``2**k`` consecutive hashes of tile level ``L``. The last tile
    read is remembered, since a proof asks for neighbouring hashes."""

    def __init__(self, size: int, read: Callable[[int, int, int], list[bytes]]) -> None:
        self.size = size
        self._read = read
        self._cache: dict[tuple[int, int], list[bytes]] = {}

    def tile(self, level: int, n: int) -> list[bytes]:
        """The hashes of tile ``(level, n)`` as far as the tree of ``size`` has them."""
        count = self.size >> (TILE_HEIGHT * level)
        width = min(TILE_WIDTH, count - n * TILE_WIDTH)
        if width <= 0:
            raise KeyError((level, n))
        key = (level, n)
        got = self._cache.get(key)
        if got is None or len(got) < width:
            got = self._read(level, n, width)
            if len(got) < width:
                raise KeyError(key)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = got
        return got[:width]

    def get(self, level: int, index: int) -> bytes:
        """See :class:`~signerd.tlog.merkle.HashStore`."""
        tl, k = divmod(level, TILE_HEIGHT)
        first = index << k  # at Merkle level 8 * tl
        last = first + (1 << k)
        if last > self.size >> (TILE_HEIGHT * tl):
            raise KeyError((level, index))
        n = first // TILE_WIDTH
        hashes = self.tile(tl, n)
        return fold(hashes[first - n * TILE_WIDTH:last - n * TILE_WIDTH])
