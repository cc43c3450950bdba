"""Start baton processes (tests, benchmark): loopback only, free ports, bounded waits, cleaned up by pid."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STARTED: list[Proc] = []   # every Proc this process started and has not seen end (see running())


def free_port() -> int:
    """A TCP port free on loopback now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """`python -m args...` in its own session; `address` once it printed BATON_READY. With
    wait=False it starts loading and `wait_ready()` joins it later, so that several load at once."""

    def __init__(self, args: list[str], env: dict | None = None, ready_timeout: float = 120.0, wait: bool = True):
        self.args = args
        self.p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                                  start_new_session=True)
        _STARTED.append(self)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.address: str | None = None
        if wait:
            self.wait_ready(ready_timeout)

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            if line.startswith("BATON_READY"):
                self.address = dict(kv.split("=", 1) for kv in line.split()[1:])["address"]
                return self.address
        self.kill()
        raise RuntimeError(f"{self.args[0]} did not start:\n" + "".join(self.log[-40:]))

    @property
    def pid(self) -> int:
        return self.p.pid

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then its exit code; None if it outlived `timeout` and was killed."""
        self.signal(signal.SIGTERM)
        return self.wait_or_kill(timeout)

    def wait_or_kill(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)


def running() -> list[Proc]:
    """The processes started here that still run (the tests check none outlives its module)."""
    _STARTED[:] = [p for p in _STARTED if p.p.poll() is None]
    return list(_STARTED)


def start_all(argvs: list[list[str]], env: dict | None = None, ready_timeout: float = 120.0) -> list[Proc]:
    """Start every process at once (each loads its model meanwhile), then wait for all to be ready."""
    procs = [Proc(argv, env=env, wait=False) for argv in argvs]
    try:
        for p in procs:
            p.wait_ready(ready_timeout)
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """SIGTERM to all at once, then wait; whoever outlives `timeout` is killed."""
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_or_kill(max(0.0, deadline - time.monotonic()))


def wait_for(pred, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
