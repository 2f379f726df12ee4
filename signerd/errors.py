"""One error tree for signerd.

Each class names a kind of fault; the server maps them to gRPC status codes
(signerd/server/_status.py) and the CLI prints ``str(error)``. Messages are
written for people and never contain secrets.
"""

from __future__ import annotations

QUOTE_CHARS = 64  # characters of a caller's value that an error message shows


def quoted(value: str, limit: int = QUOTE_CHARS) -> str:
    """``value`` (a caller's key ID, GUN, role, name...) as an error message
    quotes it: its ``repr()``, or when longer than ``limit`` characters
    (escapes included), the first of them and ``…(N bytes)``, N its size in
    UTF-8. Every message that echoes a caller's value does it through here,
    so that a message stays short whatever the value's size."""
    shown = repr(value[:limit])
    if len(value) <= limit and len(shown) <= limit + 2:
        return shown
    if len(shown) > limit + 2:  # escapes (control characters...) made it longer
        shown = shown[:limit + 1] + shown[0]
    size = len(value.encode("utf-8", "surrogatepass"))
    return f"{shown}…({size} bytes)"


class SignerdError(Exception):
    """Base of every error signerd raises on purpose."""


class InvalidArgument(SignerdError):
    """The request is malformed; the message says what is accepted."""


class NotFound(SignerdError):
    """No such key or token."""


class NoSuchKey(NotFound):
    """No key with this ID that the caller may know of: the one answer both
    for a key that does not exist and for one the caller may not read."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with ID {key_id}")


class PermissionDenied(SignerdError):
    """Policy does not grant this identity the operation."""


class ResourceExhausted(SignerdError):
    """Too many requests in flight, or a request that is too large."""


class DeadlineExceeded(SignerdError):
    """The caller's deadline passed while its request waited for its turn."""


class Cancelled(SignerdError):
    """The caller went away (cancelled, server stopping) while its request waited."""


class Unavailable(SignerdError):
    """The token is gone or unusable, or the audit log cannot be written."""


class ConfigError(SignerdError):
    """The configuration cannot be used; raised at startup and on reload."""


class TokenLoginError(ConfigError):
    """The token refused the configured PIN. Never retried: see DEVELOPERS."""


class Unauthenticated(SignerdError):
    """The peer could not be identified (no verified certificate or credentials)."""


class FailedPrecondition(SignerdError):
    """The operation is not possible in the key's current state."""
