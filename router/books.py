"""The router's books: how many requests wait and run, and how each one ended.

Every accepted request ends in exactly one of completed / failed / cancelled (a refused one is
`rejected`), counted in the same critical section that takes it off `waiting` / `running`, so
a Stats read never sees a request in neither place."""
from __future__ import annotations

import collections
import threading

from baton.errors import AlreadyExists, ResourceExhausted
from baton.request import Status

OUTCOMES = {Status.FINISHED: "completed", Status.FAILED: "failed", Status.CANCELLED: "cancelled"}


class Books:
    def __init__(self, max_queue: int, max_running: int):
        self.max_queue, self.max_running = max_queue, max_running
        self.lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.counts: collections.Counter = collections.Counter()
        self.active_ids: set[str] = set()

    def admit(self, rid: str) -> None:
        """Take a request into `waiting`, or refuse it: ALREADY_EXISTS, RESOURCE_EXHAUSTED (counted)."""
        with self.lock:
            if rid in self.active_ids:
                raise AlreadyExists(f"request_id {rid!r} is already in flight")
            if self.waiting >= self.max_queue or self.waiting + self.running >= self.max_running:
                self.counts["rejected"] += 1
                raise ResourceExhausted(f"server is at capacity ({self.waiting} waiting, {self.running} running; "
                                        f"queue limit {self.max_queue}); retry later")
            self.active_ids.add(rid)
            self.waiting += 1

    def start_running(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.running += 1

    def settle(self, rid: str, was_running: bool, outcome: Status, counted: bool = True) -> None:
        """Off `waiting` / `running`, and its outcome counted unless `counted` is False (the warm-up)."""
        with self.lock:
            self.running -= was_running
            self.waiting -= not was_running
            self.active_ids.discard(rid)
            self.counts[OUTCOMES[outcome]] += counted

    def add(self, **kw: int) -> None:
        with self.lock:
            self.counts.update(kw)

    def snapshot(self) -> tuple[int, int, collections.Counter]:
        """(running, waiting, counters), read together."""
        with self.lock:
            return self.running, self.waiting, collections.Counter(self.counts)
