"""`python -m netns_relay --listen HOST --to HOST:PORT --delay-ms D`: a TCP relay that holds
every chunk it reads for D ms before writing it on, in both directions.

It stands in for `tc netem delay` on kernels without sch_netem: each byte reaches the other side
D ms later than it would directly (one-way delay D, round trip 2 D for anything that waits for an
answer through the relay, e.g. HTTP/2 window updates and gRPC replies). What it does not emulate:
TCP's own acknowledgements are local to each leg (each leg's congestion window never sees the
delay) and no packet is lost. It keeps reading while earlier chunks wait (the delay is not a
throughput limit) up to QUEUE chunks, then stops reading (back-pressure to the sender).
Prints `BATON_READY role=relay address=HOST:PORT pid=PID` (the deploy.procs.Proc handshake).
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import time

CHUNK, QUEUE = 256 << 10, 32      # at most 8 MiB held per direction of a connection
CONNECT_TIMEOUT_S = 2.0


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def pipe(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    """src -> dst, each chunk written delay_s after it was read. EOF is passed on; an error
    closes both sockets (both peers then see the connection fail, as they would on a real link)."""
    held: queue.Queue[tuple[float, bytes]] = queue.Queue(QUEUE)

    def read() -> None:
        data = b""
        try:
            while data := src.recv(CHUNK):
                held.put((time.monotonic() + delay_s, data))
        except OSError:
            data = None
        held.put((time.monotonic() + delay_s, data))

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            due, data = held.get()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if data is None:
                raise OSError("read side failed")
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
    except OSError:
        _close(src, dst)


def serve(listen: socket.socket, target: tuple[str, int], delay_s: float) -> None:
    while True:
        client, _ = listen.accept()
        try:
            upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            _close(client)   # the far side is unreachable: the caller sees its connection refused
            continue
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pipe, args=(client, upstream, delay_s), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, delay_s), daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser(prog="netns_relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="address to listen on (port chosen freely)")
    p.add_argument("--to", required=True, help="host:port to relay to")
    p.add_argument("--delay-ms", type=float, default=1.0)
    a = p.parse_args()
    host, port = a.to.rsplit(":", 1)
    listen = socket.create_server((a.listen, 0), backlog=64)
    print(f"BATON_READY role=relay address={a.listen}:{listen.getsockname()[1]} pid={os.getpid()}", flush=True)
    serve(listen, (host, int(port)), a.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
