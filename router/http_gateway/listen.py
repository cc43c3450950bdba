"""The HTTP API's listening socket, bound by whoever starts the API: `baton up` binds it before it
starts Ray (a port in use fails at once, and nothing takes the port while the cluster comes up),
and hands it to its gateway or to the API server processes that share it."""
from __future__ import annotations

import socket


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (0 = a free port), inheritable by child processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
