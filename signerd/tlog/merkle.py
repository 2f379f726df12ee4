"""RFC 9162 (RFC 6962) Merkle tree hashing, inclusion and consistency proofs.

Hashes (RFC 9162 §2.1.1): a leaf is ``SHA-256(0x00 || data)``, an interior node
``SHA-256(0x01 || left || right)``, and the empty tree ``SHA-256("")``. A tree of
n leaves splits at k, the largest power of two below n.

The hashes of complete subtrees are what a log stores (c2sp.org/tlog-tiles
groups them in tiles): :class:`HashStore` names one by its level (height) and
index, so level 0 is the leaf hashes and ``(level, i)`` covers leaves
``[i * 2**level, (i + 1) * 2**level)``. Every other hash a proof needs is
derived from those, so proofs never read the entries themselves.

Written here rather than taken from a library: no maintained Python package
implements RFC 9162 proofs over a caller's hash storage (the tile layout is
what lets a log delete old entries and keep proving). The verification
algorithms follow RFC 9162 §2.1.3.2 and §2.1.4.2 step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one entry (RFC 9162 §2.1.1)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: an interior node (RFC 9162 §2.1.1)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class HashStore(Protocol):
    """Where a log keeps the hashes of its complete subtrees."""

    def get(self, level: int, index: int) -> bytes:
        """The hash of complete subtree ``index`` at ``level`` (2**level leaves);
        raises KeyError if it is not stored."""
        ...


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_hash(store: HashStore, start: int, end: int) -> bytes:
    """MTH(D[start:end]) from complete-subtree hashes. ``start`` must be aligned the
    way RFC 9162's recursion produces ranges (a multiple of the largest power of
    two that fits), which every range below holds."""
    n = end - start
    if n <= 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and start % n == 0:
        return store.get(n.bit_length() - 1, start // n)
    k = _split(n)
    return node_hash(subtree_hash(store, start, start + k), subtree_hash(store, start + k, end))


def root(store: HashStore, size: int) -> bytes:
    """The root hash of the tree's first ``size`` leaves."""
    return subtree_hash(store, 0, size)


def inclusion_proof(store: HashStore, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), leaf-most hash first.
    Raises ProofError unless 0 <= index < size."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            proof.append(subtree_hash(store, lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree_hash(store, lo, lo + k))
            lo = lo + k
    return proof[::-1]


def consistency_proof(store: HashStore, old: int, new: int) -> list[bytes]:
    """PROOF(old, D[0:new]) (RFC 9162 §2.1.4.1). Raises ProofError unless
    0 < old <= new (a proof from the empty tree is empty by definition: ask for none)."""
    if not 0 < old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    proof: list[bytes] = []
    lo, hi, m, complete = 0, new, old, True
    while m != hi - lo:  # SUBPROOF(m, D[lo:hi], complete)
        k = _split(hi - lo)
        if m <= k:
            proof.append(subtree_hash(store, lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree_hash(store, lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(subtree_hash(store, lo, hi))
    return proof[::-1]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root_hash: bytes) -> None:
    """Check an inclusion proof of leaf hash ``leaf`` (RFC 9162 §2.1.3.2).
    Raises ProofError if it does not verify."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != root_hash:
        raise ProofError(f"leaf {index} is not included in the tree of size {size} "
                         "with that root")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree of size ``new`` extends the one of size ``old``
    (RFC 9162 §2.1.4.2). Raises ProofError if it does not."""
    if old == new:
        if proof or old_root != new_root:
            raise ProofError(f"two different roots for size {old}")
        return
    if not 0 < old < new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    if not proof:
        raise ProofError("empty consistency proof")
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root starts the path
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError(f"the tree of size {new} does not extend the tree of size {old}")


class MemoryHashes:
    """A :class:`HashStore` in memory that is also the tree's builder: ``append``
    adds a leaf hash and every complete subtree it closes. The audit log persists
    the same levels as tiles; tests and verifiers use this as it is."""

    def __init__(self) -> None:
        self.levels: list[list[bytes]] = [[]]

    @property
    def size(self) -> int:
        """Leaves appended so far."""
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        """Add leaf hash ``leaf`` (32 bytes) and the subtrees it completes."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        self.levels[0].append(leaf)
        level = 0
        while len(self.levels[level]) % 2 == 0:
            pair = self.levels[level][-2:]
            if len(self.levels) == level + 1:
                self.levels.append([])
            self.levels[level + 1].append(node_hash(pair[0], pair[1]))
            level += 1

    def get(self, level: int, index: int) -> bytes:
        """See :class:`HashStore`."""
        try:
            return self.levels[level][index]
        except IndexError:
            raise KeyError((level, index)) from None
