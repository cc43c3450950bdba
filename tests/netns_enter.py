"""`python -m netns_enter NS MODULE ARGS...`: join the network namespace NS (/run/netns/NS, made
by `ip netns add`), then run MODULE as `python -m MODULE ARGS...` would.

This lets deploy.procs.Proc, which runs `python -m ...`, start a worker inside a namespace: the
process's pid, output and signals are the worker's own (no `ip netns exec` in between).
setns(2) moves only the calling thread, so it runs first, before any thread exists.
"""
from __future__ import annotations

import ctypes
import os
import runpy
import sys

CLONE_NEWNET = 0x40000000


def enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def main() -> None:
    ns, module, *rest = sys.argv[1:]
    enter(ns)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
