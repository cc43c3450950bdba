"""How every baton server process starts and stops: it says BATON_READY on stdout once it serves
(deploy/procs.py waits for that line), then its main thread waits for SIGTERM or SIGINT."""
from __future__ import annotations

import os
import signal
import threading


def stop_event() -> threading.Event:
    """An event that SIGTERM or SIGINT sets; install it before serving, so no signal is lost."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    return done


def announce_ready(role: str, address: str) -> None:
    print(f"BATON_READY role={role} address={address} pid={os.getpid()}", flush=True)
