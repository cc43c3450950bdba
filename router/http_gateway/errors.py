"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`, and the one map from
the router's gRPC status codes to HTTP statuses."""
from __future__ import annotations

import logging

import grpc
from fastapi.responses import JSONResponse

from baton.errors import FIELD_KEY

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). 429 means load and nothing else: the OpenAI
# clients retry it, so a request that can never succeed must not get it.
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNAUTHENTICATED: (502, "server_error"),   # the gateway's own token was refused
    grpc.StatusCode.PERMISSION_DENIED: (502, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
# The request fields the router's errors name (GenerateRequest's spelling, sent as trailing metadata:
# baton.errors.FIELD_KEY) where the HTTP API spells them differently.
HTTP_PARAM = {"max_new_tokens": "max_tokens", "json_schema": "response_format", "regex": "guided_regex",
              "grammar": "guided_grammar", "prompt_token_ids": "prompt"}


class APIError(Exception):
    """An error answer. Raised anywhere in a request's handling, it becomes the response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if self.status in (408, 413):   # the rest of the request is not read: this connection is done
            headers = {"Connection": "close"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _trailing_field(e) -> str | None:
    """The field a failed router call names (baton.errors.FIELD_KEY), from a sync or an aio call."""
    try:
        md = e.trailing_metadata()
    except Exception:   # an error that is not a call (no metadata)
        return None
    return dict(tuple(md or ())).get(FIELD_KEY)


def rpc_error(e: grpc.aio.AioRpcError | grpc.RpcError, chat: bool = False) -> APIError:
    code = e.code()
    if code not in HTTP_OF:   # INTERNAL, UNKNOWN, ...: the details are the server's business
        log.warning("router call failed: %s %s", code.name, e.details())
        return APIError(500, "internal error in the serving system", "server_error", None, code.name.lower())
    status, type_ = HTTP_OF[code]
    details = e.details() or code.name
    param = None
    if status == 400:
        field = _trailing_field(e)
        param = HTTP_PARAM.get(field, field)
        details = details.replace("max_new_tokens", "max_tokens")
        if chat and param == "prompt":
            param = "messages"
    return APIError(status, details, type_, param, code.name.lower())
