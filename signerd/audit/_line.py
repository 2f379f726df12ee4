"""One line of the audit log and its head file: the encoding, the hash chain's
links (``time``, ``seq``, ``prev``) and how a line or head is read back (see
Log file and Head file in :mod:`signerd.audit`)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from signerd.audit._fs import _why

ZERO_HASH: Final = "0" * 64
HEAD_SIZE: Final = 128
MAX_LINE_BYTES: Final = 1 << 20  # verify and the tail reader give up on longer lines
MAX_VALUE_CHARS: Final = 1024
ROTATE_OPERATION: Final = "audit.rotate"  # the "operation" of a rotation record
_RESERVED: Final = frozenset({"time", "seq", "prev"})
_HEX: Final = frozenset("0123456789abcdef")
# Compact, sorted keys, ASCII only (no raw newline or odd byte can reach the file);
# NaN is not JSON, and anything else unusual is written as its str().
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                   allow_nan=False, default=str)


def head_path(path: Path) -> Path:
    """Where the head file of the log ``path`` lives: ``<path>.head``."""
    return path.with_name(path.name + ".head")


def _now() -> str:
    # isoformat() is several times faster than strftime() on this hot path.
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _encode_line(doc: dict[str, Any], when: str, seq: int, prev: str) -> bytes:
    """``doc`` with ``time``, ``seq`` and ``prev`` set, as one line of ASCII
    JSON without its newline. ValueError: not serialisable, or too long."""
    doc.update(time=when, seq=seq, prev=prev)
    try:
        line = _ENCODER.encode(doc).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ValueError(f"audit record cannot be serialised: {e}") from None
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"audit record is {len(line)} bytes; limit {MAX_LINE_BYTES}")
    return line


def _shorten(value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[:256]}...[{len(value)} chars, sha256 {digest}]"


def _head_record(seq: int, last: str) -> bytes:
    text = f'{{"seq":{seq},"sha256":"{last}"}}'
    return text.ljust(HEAD_SIZE - 1).encode("ascii") + b"\n"


def _read_head(path: Path) -> tuple[int, str] | str | None:
    """(seq, sha256), None if there is no head file, or why it is unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"head file {path.name} cannot be read: {_why(e)}"
    try:
        doc = json.loads(raw.decode("ascii"))
        seq, sha = doc["seq"], doc["sha256"]
        if set(doc) != {"seq", "sha256"} or type(seq) is not int or seq < 0 or not _is_hash(sha):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return f"head file {path.name} is malformed (expected {{\"seq\":N,\"sha256\":HEX}})"
    return seq, sha


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _parse(line: bytes) -> tuple[int, str, str | None] | str:
    """(seq, prev, rotation) of a record line, or why it is not one.

    ``rotation`` is None for a request line; for a rotation record, the
    name of the file it continues ("" when unknown)."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(doc, dict):
        return "not a JSON object"
    seq, prev = doc.get("seq"), doc.get("prev")
    if type(seq) is not int or seq < 1:
        return "no valid 'seq'"
    if not isinstance(prev, str) or not _is_hash(prev):
        return "no valid 'prev'"
    rotation = None
    if doc.get("operation") == ROTATE_OPERATION:
        previous = doc.get("previous_file")
        # A bare file name only: a rotation record never points elsewhere.
        rotation = previous if isinstance(previous, str) and "/" not in previous else ""
    return seq, prev, rotation
