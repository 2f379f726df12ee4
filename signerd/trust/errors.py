"""Errors of the trust library, all under signerd's one error tree."""

from __future__ import annotations

from signerd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerdError,
    Unavailable,
)


class TrustError(SignerdError):
    """Base of every error the trust library raises on purpose."""


class VerificationError(TrustError):
    """A metadata file failed verification; ``file`` names it (``targets/releases.json``)."""

    def __init__(self, role: str, message: str) -> None:
        self.role = role
        self.file = f"{role}.json"
        self.reason = message
        super().__init__(f"{self.file}: {message}")


class UnsignedTag(TrustError, NotFound):
    """The tag is not signed by any trusted role: to a Content Trust client it does not exist."""


class NotAuthorized(TrustError, InvalidArgument):
    """The signer's key is not one of the keys the role lists, or the path is outside the role."""


class NotaryServerError(TrustError, Unavailable):
    """The Notary server is unreachable or refused the request; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class UnwritableValue(TrustError, InvalidArgument):
    """A string that would go into metadata holds a control character (or is not UTF-8).

    Canonical JSON writes such characters raw, which no JSON parser reads
    back; refused before anything is written. ``file`` names the file.
    """

    def __init__(self, role: str, message: str) -> None:
        self.role = role
        self.file = f"{role}.json"
        super().__init__(f"{self.file}: {message} (nothing was written)")


class DamagedState(TrustError, FailedPrecondition):
    """A bookkeeping file of a trust directory is unreadable; the message says how to recover."""
