"""The engine's admission policy, with no model in it: which prefilled requests take a row, which
prompts start, which pieces of them are prefilled this step under the per-step token budget.

`Scheduler.plan()` returns a StepPlan; the engine (engine.py) executes it: it embeds the joiners
and runs the pieces in the decode step's pass. A prompt that starts is handed to the engine's
`start_prompt` first, which allocates its K/V and says how many of its tokens a cached prefix
holds already: its pieces start after them. The scheduler holds the queues only; a request leaves
them through `remove()`, which the engine calls from its one exit, `Engine.finish_and_free`.
"""
from __future__ import annotations

import collections
from collections.abc import Callable
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

    def __init__(self, max_rows: int, max_queue: int, chunk_tokens: int,
                 start_prompt: Callable[[Request], int] = lambda req: 0):
        self.max_rows, self.max_queue, self.chunk_tokens = max_rows, max_queue, chunk_tokens
        self.start_prompt = start_prompt   # the engine's: how many of a starting prompt's tokens it holds already
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

    def plan(self, running: int) -> StepPlan:
        """The next step, for a batch of `running` rows: joiners take the free rows first; then
        prompt pieces, oldest prompt first, up to the token budget, starting waiting prompts while
        rows are left for them."""
        plan = StepPlan()
        free = self.max_rows - running - len(self.prefilling)
        plan.joining = [self.prefilled.popitem(last=False)[1] for _ in range(max(0, min(free, len(self.prefilled))))]
        rows = running + len(plan.joining)
        budget = self.chunk_tokens
        for req in self._prefill_order(rows, plan.started):
            start = self.progress[req.request_id]
            piece = Piece(req, start, req.all_ids[start:start + budget])
            plan.pieces.append(piece)
            self.progress[req.request_id] += len(piece.ids)
            budget -= len(piece.ids)
            if budget <= 0:
                break
        for piece in plan.pieces:
            if piece.last:
                self.prefilling.pop(piece.req.request_id)
                self.progress.pop(piece.req.request_id)
        return plan

    def _prefill_order(self, rows: int, started: list[Request]):
        yield from list(self.prefilling.values())
        while self.waiting and rows + len(self.prefilling) < self.max_rows:
            req = self.waiting.popitem(last=False)[1]
            req.status = Status.PREFILLING
            self.prefilling[req.request_id] = req
            self.progress[req.request_id] = self.start_prompt(req)   # a cached prefix is not prefilled again
            started.append(req)
            yield req
