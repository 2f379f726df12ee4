"""One error tree for signerd.

Each class names a kind of fault; the server maps them to gRPC status codes
(signerd/server/_status.py) and the CLI prints ``str(error)``. Messages are
written for people and never contain secrets.
"""

from __future__ import annotations


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
