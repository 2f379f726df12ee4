"""Canonical JSON as Notary and TUF sign it.

Objects have their keys sorted (by code point), there is no whitespace, and
strings escape only ``"`` and ``\\``: every other character, non-ASCII and
control characters included, is written as its UTF-8 bytes. Only integers,
strings, booleans, null, lists and objects are allowed.
"""

from __future__ import annotations

from typing import Any

from signerd.errors import InvalidArgument


def _string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if not isinstance(key, str):
                raise InvalidArgument(f"canonical JSON keys must be strings, not {key!r}")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    else:
        raise InvalidArgument(f"canonical JSON cannot encode {type(value).__name__}")


def encode_canonical(value: Any) -> bytes:
    """Return the canonical JSON encoding of ``value`` as UTF-8 bytes."""
    out: list[str] = []
    _encode(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" in JSON) has no UTF-8 form; Go's decoder
        # would turn it into U+FFFD, so the signed bytes could not match.
        raise InvalidArgument("canonical JSON strings must be valid Unicode") from None
