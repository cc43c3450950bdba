"""Errors that map to gRPC status codes, in one place (see baton.grpc_util)."""
from __future__ import annotations

import re


# Trailing-metadata key that names the side of a call that failed (a worker role), so callers
# decide on codes and metadata, never on error text.
FAILED_ROLE_KEY = "baton-failed-role"
# Trailing-metadata key for a failure's kind where the status code alone does not tell the caller
# what to do (e.g. "kv-damaged": send the same K/V again).
REASON_KEY = "baton-reason"
# Trailing-metadata key naming the request field an INVALID_ARGUMENT is about (as GenerateRequest
# spells it), so the HTTP API names its own parameter without reading the message.
FIELD_KEY = "baton-field"


class BatonError(Exception):
    """An error with a gRPC status code: the class name in UPPER_SNAKE_CASE is the code's name
    (InvalidArgument -> INVALID_ARGUMENT), unless a class sets code_name itself."""
    code_name = "INTERNAL"
    failed_role: str | None = None     # sent as FAILED_ROLE_KEY trailing metadata when set
    reason: str | None = None          # sent as REASON_KEY trailing metadata when set
    field: str | None = None           # sent as FIELD_KEY trailing metadata when set

    def __init__(self, *args, field: str | None = None):
        super().__init__(*args)
        if field is not None:
            self.field = field

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "code_name" not in cls.__dict__ and BatonError in cls.__bases__:
            cls.code_name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()


# One class per status code the system uses (grpc.StatusCode's names).
class InvalidArgument(BatonError): """The request is malformed or out of range: sending it again will not help."""
class ResourceExhausted(BatonError): """At capacity (queue, rows, message size): later, or smaller, may succeed."""
class Unavailable(BatonError): """No live worker could take it, or one went away: another try may succeed."""
class NotFound(BatonError): """No such request here (e.g. aborted, and so refused from then on)."""
class AlreadyExists(BatonError): """The request id is already on this worker, or already has a listener."""
class DeadlineExceeded(BatonError): """Its time ran out before it could finish."""
class Unauthenticated(BatonError): """Missing or wrong auth token."""
class Cancelled(BatonError): """Cancelled by its caller or by an abort."""
class FailedPrecondition(BatonError): """Not possible in this state (e.g. scaling a colocated prefill pool)."""


class KVCodecError(InvalidArgument, ValueError):
    """K/V bytes that do not match their header (baton.kv_codec)."""


class DecodeUnreachable(Unavailable):
    """A prefill worker could not hand its K/V to the decode worker: that decode worker failed."""
    failed_role = "decode"
