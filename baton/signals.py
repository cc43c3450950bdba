"""How every baton server process starts and stops: it says BATON_READY on stdout once it serves
(deploy/procs.py waits for that line), then its main thread waits for SIGTERM or SIGINT."""
from __future__ import annotations

import os
import signal
import threading
import time


_signalled_at: list[float] = []   # time.monotonic() of the first stop signal


def stop_event() -> threading.Event:
    """An event that SIGTERM or SIGINT sets; install it before serving, so no signal is lost."""
    done = threading.Event()

    def on_signal(*_) -> None:
        if not _signalled_at:
            _signalled_at.append(time.monotonic())
        done.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return done


def signalled_at() -> float | None:
    """When the first SIGTERM / SIGINT arrived (time.monotonic()), None before one did."""
    return _signalled_at[0] if _signalled_at else None


def announce_ready(role: str, address: str, **more: str) -> None:
    """BATON_READY role=... address=... pid=... [key=value ...] on stdout (deploy/procs.py reads it)."""
    extra = "".join(f" {k}={v}" for k, v in more.items())
    print(f"BATON_READY role={role} address={address} pid={os.getpid()}{extra}", flush=True)


def die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when the process that started this one exits, however it exits (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing); exit at once if it is already gone."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)
