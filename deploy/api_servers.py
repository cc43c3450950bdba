"""`baton up --api-servers N` (N > 1): N processes serve the OpenAI HTTP API, all accepting on one
listening socket that `baton up` binds on --http-host:--http-port and hands down (vLLM's
--api-server-count does the same). Each is `python -m router.http_gateway --fd FD --api-server K`,
a fresh interpreter (never a fork of this process, which runs gRPC's and Ray's threads), talking
gRPC to the one router of this process, which shares the workers among them.

Why one inherited socket rather than N sockets bound with SO_REUSEPORT: the port is bound once, by
this process, where --http-host says (port 0 works, and no other process of the same user can join
the group and take a share of the connections); the kernel queues connections once and whichever
server is free accepts the next, where SO_REUSEPORT hashes each connection to one server's queue
whatever that server's load, and drops the connections queued on a server that dies. (Each server takes
at most a few connections per wakeup of the socket, router/http_gateway/server.py SharedListener, or
one would take most of a burst.)

A server that exits on its own is restarted (its index and place kept; the others keep accepting
meanwhile) and `baton status` counts its restarts; one that exits before it ever served - it cannot
start - stops `baton up` with the reason (`on_fatal`). Each server gets SIGTERM when this process
dies, however it dies (PR_SET_PDEATHSIG: strictly, when the thread that started it ends - baton up's main
thread, or the watching thread for a restarted one, which ends only when baton up stops), and stop() ends
them all, checked by pid."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class _Server:
    """One API server process, and its life: when it said it serves, how often it was restarted."""

    def __init__(self, index: int):
        self.index, self.restarts = index, 0
        self.p: subprocess.Popen | None = None
        self.ready = threading.Event()

    def spawn(self, argv: list[str], fd: int, env: dict | None) -> None:
        self.ready = ready = threading.Event()
        # its own session: a terminal's Ctrl-C reaches baton up alone, which stops the servers itself (a server
        # that stopped on its own signal first would look crashed)
        self.p = subprocess.Popen(argv, pass_fds=(fd,), stdout=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True)
        threading.Thread(target=self._pump, args=(self.p, ready), daemon=True,
                         name=f"api-server-{self.index}-out").start()

    @staticmethod
    def _pump(p: subprocess.Popen, ready: threading.Event) -> None:
        """Its stdout: the BATON_READY line (baton/signals.py) says it serves; anything else is passed on."""
        for line in p.stdout:
            if line.startswith("BATON_READY"):
                ready.set()
            else:
                sys.stderr.write(line)

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None


class ApiServers:
    def __init__(self, router_address: str, host: str, port: int, count: int, gateway_args: list[str],
                 on_fatal: Callable[[str], None], env: dict | None = None,
                 stopping: threading.Event | None = None, sock: socket.socket | None = None):
        """`gateway_args`: `python -m router.http_gateway` flags they all get (model name, limits, ...);
        the token is passed in the environment (BATON_AUTH_TOKEN), never on a command line. `sock`:
        the listening socket, bound already (else bound here on host:port)."""
        from router.http_gateway.listen import listen_socket
        self.sock = sock if sock is not None else listen_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.router_address, self.gateway_args, self.on_fatal = router_address, gateway_args, on_fatal
        self.env = env
        self.servers = [_Server(k) for k in range(1, count + 1)]
        self._stopping = stopping or threading.Event()   # baton up's stop event: no restart once it is set
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="api-servers", daemon=True)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _argv(self, index: int) -> list[str]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return [sys.executable, "-m", "router.http_gateway", "--router", self.router_address,
                "--fd", str(self.sock.fileno()), "--api-server", str(index), "--parent-pid", str(os.getpid()),
                "--log-level", level if isinstance(level, str) else "WARNING", *self.gateway_args]

    def start(self, timeout_s: float = 120.0) -> None:
        """Start them all and wait until each serves; RuntimeError naming the one that did not."""
        for s in self.servers:
            s.spawn(self._argv(s.index), self.sock.fileno(), self.env)
        deadline = time.monotonic() + timeout_s
        for s in self.servers:
            while not s.ready.wait(0.05):
                if not s.alive or time.monotonic() > deadline:
                    why = f"exited with code {s.p.returncode}" if not s.alive else f"not serving after {timeout_s:.0f} s"
                    self.stop()
                    raise RuntimeError(f"API server {s.index} (pid {s.p.pid}) {why}")
        self._monitor.start()

    def _watch(self) -> None:
        """Restart a server that exited on its own; one that exits before it served stops baton up."""
        while not self._stopping.wait(0.2):
            for s in self.servers:
                with self._lock:
                    if self._stopping.is_set() or s.alive:
                        continue
                    rc, pid, served = s.p.returncode, s.p.pid, s.ready.is_set()
                    if not served:
                        self.on_fatal(f"API server {s.index} (pid {pid}) exited with code {rc} before it served "
                                      f"(restart {s.restarts}); stopping")
                        return
                    s.restarts += 1
                    print(f"baton: API server {s.index} (pid {pid}) exited with code {rc}; restarting it "
                          f"(restart {s.restarts})", file=sys.stderr, flush=True)
                    s.spawn(self._argv(s.index), self.sock.fileno(), self.env)

    def pb(self) -> list:
        """What `baton status` shows of them (router_pb2.ApiServer)."""
        from baton.v1 import router_pb2
        return [router_pb2.ApiServer(index=s.index, pid=s.p.pid if s.p else 0, address=self.address,
                                     alive=s.alive and s.ready.is_set(), restarts=s.restarts) for s in self.servers]

    def pids(self) -> list[int]:
        return [s.p.pid for s in self.servers if s.p is not None]

    def stop(self, timeout_s: float = 3.0) -> None:
        """SIGTERM to each (open streams get ~1 s: router/http_gateway/server.py), SIGKILL to any left after
        `timeout_s`; returns once every one has exited (reaped), then closes the socket."""
        with self._lock:
            self._stopping.set()
        procs = [s.p for s in self.servers if s.p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("API server pid %d did not stop in %.0f s: killed", p.pid, timeout_s)
                p.kill()
                p.wait()
        self.sock.close()
