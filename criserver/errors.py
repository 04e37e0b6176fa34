"""Domain errors raised anywhere below the servicers.

The instrumentation layer (`criserver.instrument`) turns each into its gRPC status code, so the
code that detects a problem says what went wrong and never deals with gRPC itself.
"""

from __future__ import annotations

import errno

import grpc


class CriError(Exception):
    """Base of all errors a CRI caller should see with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(CriError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CriError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(CriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(CriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CriError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(CriError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CriError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(CriError):
    code = grpc.StatusCode.INTERNAL


# A full filesystem or an exhausted quota: the node's problem, not the caller's, and not a bug.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of space (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS
