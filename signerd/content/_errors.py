"""Refusals of the content checks: each names the check that refused (``check``)."""

from __future__ import annotations

from signerd.errors import FailedPrecondition, InvalidArgument, Unavailable


class ContentInvalid(InvalidArgument):
    """The payload is not acceptable metadata for this key: not JSON, not canonical, wrong
    ``_type``, expiry out of bounds, a digest instead of the content (INVALID_ARGUMENT)."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(message)


class ContentStale(FailedPrecondition):
    """The payload would roll back or freeze what signerd already signed, or leave the
    delegation it was given (FAILED_PRECONDITION)."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(message)


class StateUnavailable(Unavailable):
    """The watermark store cannot be read or written; nothing is signed (fail closed)."""

    check = "state"
