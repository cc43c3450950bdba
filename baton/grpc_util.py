"""Shared gRPC plumbing: servers and channels, bearer-token auth, health, errors -> status codes."""
from __future__ import annotations

import functools
import hmac
import inspect
import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.errors import FAILED_ROLE_KEY, FIELD_KEY, REASON_KEY, BatonError, InvalidArgument

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Health and reflection stay open without a token: probes and grpcurl must reach them.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AuthInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED before any handler runs unless `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization bearer token")
        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.expected):
            return continuation(details)
        handler = continuation(details)
        kind = (handler.request_streaming, handler.response_streaming) if handler else (False, False)
        return self._deny[kind]


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, error: Exception):
        self.error = error


def _undecodable_message(method: str, e: Exception) -> str:
    return f"request bytes are not a valid {method.rsplit('/', 1)[-1]} message: {e}"


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Turns undecodable request bytes into INVALID_ARGUMENT (gRPC's own answer is INTERNAL).

    The handler's deserializer is wrapped so it returns a marker instead of raising; unary calls
    with a marker are refused before the handler runs, streamed ones when the marker is reached."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parse = details.method, handler.request_deserializer

        def safe_parse(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # google.protobuf DecodeError and kin
                return _Undecodable(e)

        if handler.request_streaming:
            def checked(requests):
                for r in requests:
                    if isinstance(r, _Undecodable):
                        raise InvalidArgument(_undecodable_message(method, r.error))
                    yield r
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            inner = getattr(handler, kind)
            return handler._replace(request_deserializer=safe_parse,
                                    **{kind: lambda requests, context: inner(checked(requests), context)})

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        inner = getattr(handler, kind)

        def guarded(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _undecodable_message(method, request.error))
            return inner(request, context)
        return handler._replace(request_deserializer=safe_parse, **{kind: guarded})


# Keep-alive pings on links between our own processes: a peer that is stopped or cut off fails
# the calls on its channel within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS instead of hanging them.
KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS = 10_000, 5_000
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    # Servers accept those pings (gRPC's default answers pings more often than every 5 min with GOAWAY).
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2)]


def worker_threads(max_batch: int, max_queue: int) -> int:
    """A worker's gRPC threads: each request it holds keeps one in a stream (Attach) and, on a
    colocated worker, one in its Prefill call, running or queued; health checks, Stats, aborts and
    K/V pushes need spares beside them. A smaller pool starves the health check under a burst and
    the router takes the worker for dead (seen: 256 requests at --max-batch 128, 193 failed)."""
    return 2 * (max_batch + max_queue) + 16


def make_server(host: str = "127.0.0.1", port: int = 0, *, max_workers: int = 64,
                auth_token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                tls_client_ca: str | None = None,
                max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """A gRPC server bound to host:port (0 = a free port); returns it and the bound port.
    With tls_client_ca, the TLS handshake demands a client certificate signed by that CA (mutual TLS)."""
    # Auth first: an unauthenticated caller learns nothing, not even that its bytes were bad.
    interceptors = ([AuthInterceptor(auth_token)] if auth_token else []) + [DecodeGuardInterceptor()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=server_options(max_message_bytes))
    if tls_cert and tls_key:
        client_ca = _read(tls_client_ca)
        creds = grpc.ssl_server_credentials([(_read(tls_key), _read(tls_cert))], root_certificates=client_ca,
                                            require_client_auth=client_ca is not None)
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_channel(address: str, *, tls_root_cert: str | None = None, tls_client_cert: str | None = None,
                 tls_client_key: str | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 keepalive: bool = False) -> grpc.Channel:
    """A channel; TLS when tls_root_cert is given, presenting tls_client_cert/key when given (mutual TLS).
    `keepalive`: ping the peer (links to baton's own servers, which accept the pings)."""
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), *(KEEPALIVE_OPTIONS if keepalive else [])]
    if tls_root_cert:
        creds = grpc.ssl_channel_credentials(_read(tls_root_cert), private_key=_read(tls_client_key),
                                             certificate_chain=_read(tls_client_cert))
        return grpc.secure_channel(address, creds, options=opts)
    return grpc.insecure_channel(address, options=opts)


def failed_role(e: grpc.RpcError) -> str | None:
    """The worker role a failed call names in its trailing metadata (see BatonError.failed_role)."""
    return _trailing(e, FAILED_ROLE_KEY)


def reason(e: grpc.RpcError) -> str | None:
    """The failure kind a failed call names in its trailing metadata (see BatonError.reason)."""
    return _trailing(e, REASON_KEY)


def field_of(e: grpc.RpcError) -> str | None:
    """The request field a failed call names in its trailing metadata (see BatonError.field)."""
    return _trailing(e, FIELD_KEY)


def _trailing(e: grpc.RpcError, key: str) -> str | None:
    md = e.trailing_metadata() if isinstance(e, grpc.Call) else None
    return dict(md or ()).get(key)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def add_health_and_reflection(server: grpc.Server, service_names: list[str]) -> health.HealthServicer:
    """Health starts NOT_SERVING for every service and overall ('')."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def set_health(servicer: health.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        servicer.set(name, status)


def _abort(context: grpc.ServicerContext, e: Exception, method: str):
    if isinstance(e, BatonError):
        md = tuple((k, v) for k, v in ((FAILED_ROLE_KEY, e.failed_role), (REASON_KEY, e.reason),
                                        (FIELD_KEY, e.field)) if v)
        if md:
            context.set_trailing_metadata(md)
        context.abort(getattr(grpc.StatusCode, e.code_name), str(e))
    if isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):  # a downstream call failed: pass its code on
        if field := field_of(e):
            context.set_trailing_metadata(((FIELD_KEY, field),))
        context.abort(e.code(), f"upstream: {e.details()}")
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")


def rpc(fn: Callable) -> Callable:
    """Handler decorator: BatonError -> its status code, anything else -> INTERNAL (logged, no stack
    trace sent). Handlers raise BatonError; they never call context.abort themselves."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream_wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as e:
                if context.is_active():
                    _abort(context, e, fn.__name__)
        return stream_wrapper

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as e:
            if not context.is_active():   # the caller cancelled (e.g. a K/V push stopped): nobody to answer
                log.debug("%s: the caller went away (%s)", fn.__name__, type(e).__name__)
                # abort, not `return None`: gRPC would try to serialise None and log an error for it
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            _abort(context, e, fn.__name__)
    return wrapper
