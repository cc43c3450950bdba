"""Limits on the gateway's HTTP connections and bodies, and the flags of the HTTP API shared by
`python -m router.http_gateway` and `baton up` (the served model name and the limits)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from baton.grpc_util import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = MAX_MESSAGE_BYTES   # a larger body could not be forwarded to the router anyway
    keep_alive_s: float = 5.0                 # an idle connection (no request in progress) is closed after this
    header_timeout_s: float = 10.0            # a request's head must be complete this long after the connection
    #                                           opens or the previous response ends, however slowly it trickles
    body_timeout_s: float = 60.0              # and its body within this of its head (else 408)
    max_connections: int = 1024               # more open connections (or requests in progress) get 503
    max_message_bytes: int = MAX_MESSAGE_BYTES  # the largest gRPC message the router takes (its --max-message-bytes)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", "--model-name", dest="served_model_name", default=None,
                   help="the model name the HTTP API reports in /v1/models and accepts in requests (others get "
                        "404 model_not_found) (default: the router's --model, a directory's last part)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="the HTTP API's deadline for each generation, seconds: a request still running then "
                        "gets 504 (default: none)")
    g = p.add_argument_group("HTTP limits")
    for flag, field, kind, what in HTTP_LIMIT_FLAGS:
        g.add_argument(flag, dest=field, type=kind, default=getattr(HttpLimits, field),
                       metavar="N" if kind is int else "SECONDS",
                       help=what + " (default: %(default)s)")


# flag, its HttpLimits field, type, what it does
HTTP_LIMIT_FLAGS = (
    ("--http-max-body-bytes", "max_body_bytes", int,
     "larger request bodies get 413, refused from their Content-Length before they are read"),
    ("--http-keep-alive", "keep_alive_s", float, "seconds an idle connection stays open"),
    ("--http-header-timeout", "header_timeout_s", float,
     "seconds a client gets to send a request's head, however slowly"),
    ("--http-body-timeout", "body_timeout_s", float, "seconds a client gets to send a request's body after its "
     "head; then 408"),
    ("--http-max-connections", "max_connections", int,
     "open connections (and requests in progress) beyond this get 503"),
)


def from_args(a: argparse.Namespace, max_message_bytes: int = MAX_MESSAGE_BYTES) -> HttpLimits:
    return HttpLimits(**{field: getattr(a, field) for _, field, _, _ in HTTP_LIMIT_FLAGS},
                      max_message_bytes=max_message_bytes)
