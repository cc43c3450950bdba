"""How long `baton up` takes to stop on SIGTERM, measured from outside (not collected by pytest):
from the signal to the last process of its tree gone (the router process, Ray's processes, the
worker actors), next to the figure its own log prints.

    .venv/bin/python tests/stop_time.py [--runs 3] [--stream] -- --model smollm2

`--stream`: one request streams (ignore_eos, long) when the signal goes. Arguments after `--` are
passed to `baton up` (the default `--port 0`). Prints one line per run and the median.
"""
from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.procs import Proc  # noqa: E402

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def measure(up_args: list[str], stream: bool, limit_s: float = 30.0) -> tuple[float, str, int]:
    """(seconds from SIGTERM to the last process gone, the log's "stopped in" line, processes in the tree)."""
    proc = Proc(["deploy.cli", "up", "--port", "0", *up_args], env=ENV, ready_timeout=300)
    procs = tree(proc.pid)
    client = streaming = None
    try:
        if stream:
            from router.client import RouterClient
            client = RouterClient(proc.address)
            streaming = client.generate_stream([5, 6, 7], max_new_tokens=4000, ignore_eos=True, timeout=120)
            next(streaming)   # decoding now
            threading.Thread(target=lambda: [None for _ in _quiet(streaming)], daemon=True).start()
        procs = tree(proc.pid)
        t = time.monotonic()
        proc.signal(signal.SIGTERM)
        while alive(procs) and time.monotonic() - t < limit_s:
            time.sleep(0.01)
        took = time.monotonic() - t
        left = alive(procs)
        for p in left:
            p.kill()
        proc.wait_or_kill(5)
        if left:
            took = float("inf")
    finally:
        if client is not None:
            client.close()
        proc.kill()
    said = next((line.strip() for line in proc.log if "stopped in" in line), "(no 'stopped in' line)")
    ready = next((m.group(0) for line in proc.log if (m := re.search(r"ready in [0-9.]+ s", line))), "")
    return took, f"{said}; {ready}", len(procs)


def _quiet(it):
    try:
        yield from it
    except Exception:   # noqa: BLE001 - the stream is cut by the shutdown
        return


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    up_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args(own)
    took = []
    for i in range(a.runs):
        s, said, n = measure(up_args, a.stream)
        took.append(s)
        print(f"run {i + 1}: last of {n} processes gone {s:.2f} s after SIGTERM; log: {re.sub(r'^.*baton: ', '', said)}",
              flush=True)
    print(f"median {statistics.median(took):.2f} s ({'a stream open' if a.stream else 'idle'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
