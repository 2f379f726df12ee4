"""Transparency-log primitives for the audit log (issue 25): RFC 9162 Merkle trees
and proofs (:mod:`signerd.tlog.merkle`), and C2SP signed notes, checkpoints and
cosignatures (:mod:`signerd.tlog.note`).

Pure functions over bytes: no I/O, no token, no gRPC. The audit log keeps the
tree's hashes and signs checkpoints with a key on a token; witnesses and
``signerctl audit`` verify with these same functions.
"""
