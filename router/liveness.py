"""The router's one watcher of silent decode workers: every quarter second it asks each running
request whether its decode worker has been silent too long (RequestRun.check_silence, which cuts
the request's stream so that it migrates)."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.request_run import RequestRun


class LivenessWatcher(threading.Thread):
    """Cuts the attach stream of any run whose decode worker has fallen silent (see RequestRun)."""

    def __init__(self, period_s: float = 0.25):
        super().__init__(name="router-liveness", daemon=True)
        self.period_s = period_s
        self.runs: set[RequestRun] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def watch(self, run: RequestRun) -> None:
        with self.lock:
            self.runs.add(run)

    def forget(self, run: RequestRun) -> None:
        with self.lock:
            self.runs.discard(run)

    def run(self) -> None:
        while not self.stopped.wait(self.period_s):
            with self.lock:
                runs = list(self.runs)
            now = time.monotonic()
            for r in runs:
                r.check_silence(now)
