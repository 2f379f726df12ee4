"""What ``signerctl sign`` and ``verify`` send or check, read in bounded memory.

A file that fits in one request of the daemon's size limit (the client
config's ``max_message_bytes``, by default the daemon's default) is sent
whole, as before: the daemon hashes it. A bigger one is hashed here in
chunks, with the hash the daemon would use for the key (signerd.keys:
SHA-256; SHA-384 for ecdsa-p384), and only the digest is sent: the token
signs the same digest either way, so the signature is the one the whole
message would get (RSA PSS keeps salt 32, signing.digest_of). Ed25519 is
pure EdDSA and needs the whole message: a file above the limit is refused
before it is read. ``verify`` hashes in chunks too (Ed25519: the file is
mapped, not copied).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from signerd.cli._util import CliError
from signerd.keys import Algorithm

CHUNK = 1 << 20  # bytes read at a time
MAX_DIGEST_INPUT = 4096  # bytes: a --digest file holds a digest (hex or raw), never more


@dataclass(frozen=True)
class Payload:
    """A message to send whole (``prehashed`` False) or the digest of one."""

    data: bytes
    prehashed: bool


def open_input(name: str) -> BinaryIO:
    """``name`` opened for reading (``-``: standard input). Raises CliError."""
    if name == "-":
        return sys.stdin.buffer
    try:
        return open(name, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None


def size_of(stream: BinaryIO) -> int | None:
    """The size in bytes of a regular file; None for a pipe, a terminal..."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None
    import stat

    return st.st_size if stat.S_ISREG(st.st_mode) else None


def read_at_most(stream: BinaryIO, name: str, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of ``stream``: one more than ``limit``
    tells the caller there is more. Raises CliError."""
    try:
        return stream.read(limit + 1)
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None


def chunks(stream: BinaryIO, name: str, first: bytes = b"") -> Iterator[bytes]:
    """``first``, then the rest of ``stream`` in CHUNK-byte pieces."""
    if first:
        yield first
    while True:
        try:
            block = stream.read(CHUNK)
        except OSError as e:
            raise CliError(f"cannot read {name}: {e.strerror}") from None
        if not block:
            return
        yield block


def digest(alg: Algorithm, pieces: Iterator[bytes]) -> bytes:
    """The digest the daemon would sign for the whole message ``pieces``
    make (the key's hash: signerd.keys.Algorithm.hash_name)."""
    assert alg.hash_name is not None, "ed25519 signs whole messages"
    h = hashlib.new(alg.hash_name)
    for piece in pieces:
        h.update(piece)
    return h.digest()


def read_digest(name: str) -> bytes:
    """A precomputed digest from ``name``: hex text (``sha256:`` or
    ``sha384:`` may lead) or raw bytes. Raises CliError for a file bigger
    than any digest could be (it was read whole before)."""
    stream = open_input(name)
    try:
        data = read_at_most(stream, name, MAX_DIGEST_INPUT)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if len(data) > MAX_DIGEST_INPUT:
        raise CliError(f"{name} is not a digest (more than {MAX_DIGEST_INPUT} bytes); "
                       "leave out --digest to sign or verify the file itself")
    text = data.strip()
    try:  # a digest may be given as hex text or as raw bytes
        return bytes.fromhex(text.decode().removeprefix("sha256:").removeprefix("sha384:"))
    except (UnicodeDecodeError, ValueError):
        return data


def whole_message(stream: BinaryIO, name: str) -> bytes | mmap.mmap:
    """The whole of ``stream`` for a local Ed25519 check: a regular file is
    mapped (its pages are the page cache's, not a copy), anything else read."""
    if size_of(stream):
        try:
            return mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            pass
    return b"".join(chunks(stream, name))


def too_big_for_ed25519(name: str, size: int | str, limit: int, where: str) -> CliError:
    """The one line for an Ed25519 message above the daemon's request limit."""
    return CliError(
        f"{name} is {size} bytes, more than {where} takes in one request ({limit} bytes, "
        "max_message_bytes); an ed25519 key signs the whole message (pure EdDSA), so it "
        "cannot be sent as a digest: use an ECDSA or RSA key, or raise [server] "
        "max_message_bytes on the daemon and max_message_bytes in the client config")


def request_overhead(key_id: str, size: int) -> int:
    """Bytes a SignRequest adds around a ``size``-byte message (protobuf
    encoding: key_id, the message field's tag and length, encoding and
    padding), counted high so that a request that passes fits."""
    varint = max(1, (size.bit_length() + 6) // 7)
    return (3 + len(key_id.encode())) + (1 + varint) + 2 * 2
