"""Errors that map to gRPC status codes, in one place (see baton.grpc_util)."""
from __future__ import annotations


class BatonError(Exception):
    code_name = "INTERNAL"


class InvalidArgument(BatonError):
    code_name = "INVALID_ARGUMENT"


class ResourceExhausted(BatonError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(BatonError):
    code_name = "UNAVAILABLE"


class NotFound(BatonError):
    code_name = "NOT_FOUND"


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
