"""Running the gateway: uvicorn in a background thread with the connection limits of HttpLimits
(keep-alive, a deadline for each request's head, a cap on connections), and the command line,
`python -m router.http_gateway`."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import threading
import time

import h11
from fastapi import FastAPI

from baton.signals import announce_ready, stop_event
from router.http_gateway import config
from router.http_gateway.app import create_app
from router.http_gateway.config import HttpLimits
from router.http_gateway.gateway import Gateway
from router.http_gateway.listen import listen_socket

log = logging.getLogger(__name__)


def deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing the connections it would keep forever: a new connection that
    sends nothing (uvicorn arms its keep-alive timer only after a response), and one whose request
    head trickles in (every byte resets that timer). A head must be complete `header_timeout_s`
    after the connection opens or the previous response ends."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._close_idle)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:   # a request's head is in
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._close_idle)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _close_idle(self) -> None:
            if not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

    return DeadlineH11Protocol


class GatewayHandle:
    def __init__(self, server, thread: threading.Thread, sock: socket.socket, app: FastAPI):
        self.server, self.thread, self.sock, self.app = server, thread, sock, app
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving: open streams get ~1 s, then are cut (their gRPC calls are cancelled)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(1.0)
        with contextlib.suppress(OSError):
            self.sock.close()



class SharedListener(socket.socket):
    """A listening socket that several processes accept on (`baton up --api-servers N`), taking at most
    ACCEPTS_PER_WAKEUP connections each time its event loop finds it readable. asyncio drains the whole
    queue in one go (uvicorn asks for up to 2048), so one process took most of a burst of connections;
    after a pause the socket is still readable, every process's loop is woken again and the next
    connections go to whichever is free. 256 streams opened at once on `--api-servers 2` (2 cores, three
    bursts each): the smaller share was 17, 97 and 23 of 256 draining the queue, 110, 119 and 57 taking 4
    a wakeup (61, 112 and 70 taking 1)."""
    ACCEPTS_PER_WAKEUP = 4
    _taken = 0

    def accept(self):
        self._taken += 1
        if self._taken > self.ACCEPTS_PER_WAKEUP:
            self._taken = 0
            raise BlockingIOError("a pause: the other API servers take the next connections")
        try:
            return super().accept()
        except BlockingIOError:
            self._taken = 0   # the queue is empty: the next wakeup starts a new count
            raise


def start_gateway(router_address: str, host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None, *,
                  router_auth_token: str | None = None, model_name: str | None = None,
                  tls_root_cert: str | None = None, request_timeout_s: float | None = None,
                  limits: HttpLimits = HttpLimits(), log_level: str = "warning",
                  sock: socket.socket | None = None, local_router=None) -> GatewayHandle:
    """Serve the HTTP API on host:port (0 = a free port) in a background thread; returns a handle
    with .port, .url and .stop(). `auth_token` guards /v1/* (and is sent to the router unless
    `router_auth_token` is given). `sock`: a listening socket to accept on instead (host and port
    unused), e.g. the one `baton up --api-servers N` shares among its API server processes.
    `local_router`: the router's servicer, when the router runs in this process (router/local_call.py)."""
    import uvicorn
    gw = Gateway(router_address, auth_token, router_auth_token, model_name, tls_root_cert, request_timeout_s,
                 max_message_bytes=limits.max_message_bytes, local_router=local_router)
    app = create_app(gw, limits)
    sock = sock if sock is not None else listen_socket(host, port)
    server_config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=1,
                                   lifespan="on", loop="asyncio", http=deadline_protocol(limits.header_timeout_s),
                                   ws="none", timeout_keep_alive=limits.keep_alive_s,
                                   limit_concurrency=limits.max_connections)
    server = uvicorn.Server(server_config)
    started = threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            failure.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=run, name=f"http-gateway-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and not started.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError(f"the HTTP gateway did not start: {failure[0] if failure else 'timeout'}")
    handle = GatewayHandle(server, thread, sock, app)
    log.info("HTTP gateway on %s -> router %s", handle.url, router_address)
    return handle


def build_parser() -> argparse.ArgumentParser:
    import router.http_gateway as package
    p = argparse.ArgumentParser(prog="python -m router.http_gateway", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", default="127.0.0.1:50051", help="the router's gRPC address (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port, 0 = a free one (default: %(default)s)")
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="require 'Authorization: Bearer <token>' on /v1/*; also sent to the router "
                        "(default: $BATON_AUTH_TOKEN, else none)")
    p.add_argument("--router-auth-token", default=None, help="the router's token, when it differs (default: none)")
    p.add_argument("--tls-root-cert", help="CA certificate of a TLS router (default: plain TCP)")
    p.add_argument("--max-message-bytes", type=int, default=HttpLimits().max_message_bytes,
                   help="the router's --max-message-bytes: larger requests get 413 (default: %(default)s)")
    config.add_args(p)
    p.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    g = p.add_argument_group("one of `baton up --api-servers N`'s API servers (deploy/api_servers.py starts them)")
    g.add_argument("--fd", type=int, default=None, help="accept on this inherited listening socket instead of "
                                                         "binding --host:--port (default: none, bind)")
    g.add_argument("--api-server", type=int, default=None, metavar="K",
                   help="this process is API server K: /metrics counts its requests as api_server=K, and leaves "
                        "per-request metrics to the router, which records them in the shared metrics directory "
                        "(default: none, a lone gateway that records its own)")
    g.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (baton up) is gone (default: none, no parent watched)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s http %(name)s: %(message)s")
    done = stop_event()
    if a.parent_pid is not None:
        from baton.signals import die_with_parent
        die_with_parent(a.parent_pid)
    if a.api_server is not None:
        from router import metrics
        metrics.serve_as_api_server(a.api_server)
    sock = SharedListener(fileno=a.fd) if a.fd is not None else None
    gateway = start_gateway(a.router, a.host, a.port, a.auth_token, router_auth_token=a.router_auth_token,
                            model_name=a.served_model_name, tls_root_cert=a.tls_root_cert,
                            request_timeout_s=a.request_timeout, limits=config.from_args(a, a.max_message_bytes),
                            sock=sock)
    announce_ready("http", f"{a.host if a.fd is None else gateway.host}:{gateway.port}")
    done.wait()
    gateway.stop()
    return 0
