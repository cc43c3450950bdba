"""The engine's admission policy without a model (baton/engine/scheduler.py): budgets, rows, order."""
from __future__ import annotations

import pytest

from baton.engine.scheduler import QueueFull, Scheduler
from baton.request import Request, Status
from baton.sampling import SamplingParams


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=4))


def _plan(s: Scheduler, running: int, budget: int = 512, cached=lambda req: 0):
    """One step's plan, as the engine makes it: admit, begin (what each start finds cached), pieces."""
    plan = s.admit(running, budget)
    for req in plan.started:
        s.begin(req, cached(req))
    plan.pieces = s.pieces(budget)
    return plan


def _pieces(plan):
    return [(p.req.request_id, p.start, len(p.ids), p.last) for p in plan.pieces]


def test_a_long_prompt_is_prefilled_over_steps_within_the_budget():
    s = Scheduler(max_rows=4, max_queue=8)
    s.add(_req("a", 1200))
    first = _plan(s, 0)
    assert [r.request_id for r in first.started] == ["a"] and _pieces(first) == [("a", 0, 512, False)]
    assert _pieces(_plan(s, 0)) == [("a", 512, 512, False)]
    last = _plan(s, 0)
    assert _pieces(last) == [("a", 1024, 176, True)] and not last.started
    assert len(s) == 0 and not _plan(s, 0).pieces


def test_oldest_prompt_first_and_the_rest_of_the_budget_to_the_next():
    s = Scheduler(max_rows=4, max_queue=8)
    for r in (_req("a", 300), _req("b", 300), _req("c", 10)):
        s.add(r)
    assert _pieces(_plan(s, 0)) == [("a", 0, 300, True), ("b", 0, 212, False)]
    assert _pieces(_plan(s, 1)) == [("b", 212, 88, True), ("c", 0, 10, True)]


def test_a_prompt_with_a_cached_prefix_is_prefilled_from_its_end_and_the_budget_goes_further():
    held = {"a": 480, "b": 0}   # what the engine finds cached when each starts for each
    s = Scheduler(max_rows=4, max_queue=8)
    s.add(_req("a", 500))
    s.add(_req("b", 600))
    assert _pieces(_plan(s, 0, cached=lambda req: held[req.request_id])) == [("a", 480, 20, True), ("b", 0, 492, False)]


def test_a_prompt_starts_only_when_a_row_is_left_for_it():
    s = Scheduler(max_rows=2, max_queue=8)
    s.add(_req("a", 1000))
    s.add(_req("b", 5))
    plan = _plan(s, 1)                    # one row free: a takes it while it is prefilled
    assert [r.request_id for r in plan.started] == ["a"] and plan.started[0].status is Status.PREFILLING
    assert s.waiting["b"].status is Status.WAITING
    s.add_prefilled(_req("x", 3), "kv-x")
    assert _plan(s, 1).joining == []      # a's prefill holds the last row: x waits
    assert [r.request_id for r, _ in _plan(s, 0).joining] == ["x"]


def test_prefilled_requests_join_free_rows_first_in_arrival_order():
    s = Scheduler(max_rows=3, max_queue=8)
    for rid in ("x", "y", "z"):
        s.add_prefilled(_req(rid, 3), f"kv-{rid}")
    s.add(_req("a", 5))
    plan = _plan(s, 1)
    assert [(r.request_id, kv) for r, kv in plan.joining] == [("x", "kv-x"), ("y", "kv-y")]
    assert not plan.pieces                      # no row left for a
    assert s.prefilled["z"][0].status is Status.WAITING
    assert [r.request_id for r, _ in _plan(s, 2).joining] == ["z"]


def test_queue_bound_and_removal_from_any_queue():
    s = Scheduler(max_rows=4, max_queue=3)
    s.add(_req("a", 10))
    s.add(_req("b", 2))
    _plan(s, 0, budget=4)                       # a prefilling, 4 of its 10 tokens done; b waiting
    s.add_prefilled(_req("c", 2), "kv")
    with pytest.raises(QueueFull):
        s.add(_req("d", 1))
    assert [s.remove(rid).request_id for rid in ("a", "b", "c")] == ["a", "b", "c"]
    assert s.remove("a") is None and len(s) == 0 and not s.progress


def test_a_waiting_prompt_starts_only_when_the_steps_budget_reaches_it():
    s = Scheduler(max_rows=4, max_queue=8)
    s.add(_req("a", 100))
    s.add(_req("b", 10))
    plan = _plan(s, 0, budget=64)                 # a takes the whole budget: b stays queued, holds no row
    assert [r.request_id for r in plan.started] == ["a"] and "b" in s.waiting
    plan = _plan(s, 0, budget=64)                 # a's last 36 tokens leave 28 for b
    assert [r.request_id for r in plan.started] == ["b"]
    assert _pieces(plan) == [("a", 64, 36, True), ("b", 0, 10, True)]


def test_prompts_starting_count_those_in_prefill_and_those_a_free_row_waits_for():
    s = Scheduler(max_rows=4, max_queue=8)
    for rid in "abcde":
        s.add(_req(rid, 100))
    assert s.starting(running=1) == 3                # three rows free, five prompts waiting
    _plan(s, 1, budget=150)                          # a and b start (b only partly prefilled): a takes its row
    assert s.starting(running=2) == 2                # b in prefill, and c for the last free row
    s.add_prefilled(_req("x", 3), "kv")
    assert s.starting(running=2) == 1                # x takes the free row first
