"""The engine's admission policy, with no model in it: which prefilled requests take a row, which
prompts start, which pieces of them are prefilled this step under the step's token budget.

A step is planned in two calls, and the scheduler never calls the engine: `admit()` gives the
joiners their rows and starts prompts while rows and budget are left; the engine allocates each
starting prompt's K/V and tells `begin()` how many of its tokens a cached prefix holds already;
`pieces()` then cuts this step's prompt pieces, oldest prompt first, from where each stands. The
engine (engine.py) executes the plan. The scheduler holds the queues only; a request leaves them
through `remove()`, which the engine calls from its one exit, `Engine.finish_and_free`.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from baton.request import Request, Status


class QueueFull(Exception):
    pass


@dataclass
class Piece:
    """Prompt tokens [start, start + len(ids)) of one request, prefilled this step."""
    req: Request
    start: int
    ids: list[int]

    @property
    def last(self) -> bool:
        """The prompt's last piece: its logits give the first token."""
        return self.start + len(self.ids) == len(self.req.all_ids)


@dataclass
class StepPlan:
    joining: list[tuple[Request, Any]] = field(default_factory=list)   # prefilled elsewhere: (request, its K/V)
    started: list[Request] = field(default_factory=list)               # prompts whose prefill begins: need K/V
    pieces: list[Piece] = field(default_factory=list)                  # oldest prompt first


class Scheduler:
    """FIFO queues: prompts to prefill here (`waiting`, then `prefilling` over several steps) and
    requests prefilled elsewhere (`prefilled`). A prompt being prefilled holds the row it will take."""

    def __init__(self, max_rows: int, max_queue: int):
        self.max_rows, self.max_queue = max_rows, max_queue
        self.waiting: collections.OrderedDict[str, Request] = collections.OrderedDict()
        self.prefilling: collections.OrderedDict[str, Request] = collections.OrderedDict()
        self.progress: dict[str, int] = {}       # request_id -> prompt tokens prefilled so far
        self.prefilled: collections.OrderedDict[str, tuple[Request, Any]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.prefilled)

    def check_room(self) -> None:
        if len(self) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")

    def add(self, req: Request) -> None:
        """A prompt to prefill in this process."""
        self.check_room()
        self.waiting[req.request_id] = req

    def add_prefilled(self, req: Request, kv: Any) -> None:
        """A request prefilled elsewhere (its K/V here, in full); WAITING for the next free row."""
        self.check_room()
        self.prefilled[req.request_id] = (req, kv)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of whichever queue holds it (None if none does)."""
        self.progress.pop(request_id, None)
        for queue in (self.waiting, self.prefilling):
            if request_id in queue:
                return queue.pop(request_id)
        if request_id in self.prefilled:
            return self.prefilled.pop(request_id)[0]
        return None

    def starting(self, running: int) -> int:
        """Prompts that would hold a row this step beside `running` rows: those in prefill, and
        waiting ones with a row free for them (what the step's budget weighs against the rows)."""
        free = self.max_rows - running - len(self.prefilling) - len(self.prefilled)
        return len(self.prefilling) + max(0, min(free, len(self.waiting)))

    def admit(self, running: int, budget: int) -> StepPlan:
        """The next step's rows, for a batch of `running` rows: joiners take the free rows first;
        then waiting prompts start (PREFILLING, holding a row each) while rows are left and the
        prompts already in prefill leave some of the step's `budget` of tokens to them. The
        engine answers each started prompt with `begin()` before asking for `pieces()`."""
        plan = StepPlan()
        free = self.max_rows - running - len(self.prefilling)
        plan.joining = [self.prefilled.popitem(last=False)[1] for _ in range(max(0, min(free, len(self.prefilled))))]
        rows = running + len(plan.joining)
        left = budget - sum(r.num_tokens - self.progress.get(r.request_id, 0) for r in self.prefilling.values())
        while self.waiting and left > 0 and rows + len(self.prefilling) < self.max_rows:
            req = self.waiting.popitem(last=False)[1]
            req.status = Status.PREFILLING
            self.prefilling[req.request_id] = req
            plan.started.append(req)
            left -= req.num_tokens
        return plan

    def begin(self, req: Request, cached: int) -> None:
        """A started prompt's first `cached` tokens are in its K/V already (a cached prefix): its
        prefill starts after them."""
        self.progress[req.request_id] = cached

    def pieces(self, budget: int) -> list[Piece]:
        """This step's prompt pieces: oldest prompt first, up to `budget` tokens. A prompt whose
        last piece this is leaves the queues (its row is taken in this step)."""
        out = []
        for req in self.prefilling.values():
            if budget <= 0:
                break
            start = self.progress.get(req.request_id, 0)
            out.append(Piece(req, start, req.all_ids[start:start + budget]))
            budget -= len(out[-1].ids)
        for piece in out:
            self.progress[piece.req.request_id] = piece.start + len(piece.ids)
            if piece.last:
                self.prefilling.pop(piece.req.request_id)
                self.progress.pop(piece.req.request_id)
        return out
