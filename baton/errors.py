"""Errors that map to gRPC status codes, in one place (see baton.grpc_util)."""
from __future__ import annotations


# Trailing-metadata key that names the side of a call that failed (a worker role), so callers
# decide on codes and metadata, never on error text.
FAILED_ROLE_KEY = "baton-failed-role"
# Trailing-metadata key for a failure's kind where the status code alone does not tell the caller
# what to do (e.g. "kv-damaged": send the same K/V again).
REASON_KEY = "baton-reason"


class BatonError(Exception):
    code_name = "INTERNAL"
    failed_role: str | None = None     # sent as FAILED_ROLE_KEY trailing metadata when set
    reason: str | None = None          # sent as REASON_KEY trailing metadata when set


class InvalidArgument(BatonError):
    code_name = "INVALID_ARGUMENT"


class ResourceExhausted(BatonError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(BatonError):
    code_name = "UNAVAILABLE"


class NotFound(BatonError):
    code_name = "NOT_FOUND"


class KVCodecError(InvalidArgument, ValueError):
    """K/V bytes that do not match their header (baton.kv_codec)."""


class AlreadyExists(BatonError):
    code_name = "ALREADY_EXISTS"


class DeadlineExceeded(BatonError):
    code_name = "DEADLINE_EXCEEDED"


class Unauthenticated(BatonError):
    code_name = "UNAUTHENTICATED"


class Cancelled(BatonError):
    code_name = "CANCELLED"


class FailedPrecondition(BatonError):
    code_name = "FAILED_PRECONDITION"


class DecodeUnreachable(Unavailable):
    """A prefill worker could not hand its K/V to the decode worker: that decode worker failed."""
    failed_role = "decode"
