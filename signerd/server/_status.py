"""Map signerd's error tree to gRPC status codes. Only the server knows gRPC."""

from __future__ import annotations

import grpc

from signerd import errors

_CODES: tuple[tuple[type[errors.SignerdError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.TokenLoginError, grpc.StatusCode.UNAVAILABLE),
)


def code_for(error: errors.SignerdError | None) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_name(code: grpc.StatusCode) -> str:
    return str(code.name)
