"""The decode worker's leases, tombstones and reap, in process: a fake engine loop and a fake
clock, so time passes only when the test says so (decode_service/worker.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from baton.errors import AlreadyExists, NotFound
from baton.request import Request
from baton.sampling import SamplingParams
from decode_service.worker import DecodeWorker


class FakeLoop:
    """What DecodeWorker asks of an EngineLoop: submit a request, abort one."""

    def __init__(self):
        self.info = SimpleNamespace(kv_shape=(2, 2, 2, 4), dtype=None, vocab_size=100, max_len=64, grammars=None)
        self.submitted, self.aborted = [], []

    def submit(self, req):
        self.submitted.append(req.request_id)
        return f"stream-of-{req.request_id}"

    def abort(self, request_id):
        self.aborted.append(request_id)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env():
    loop, clock = FakeLoop(), Clock()
    return DecodeWorker(loop, lease_s=30.0, tombstone_s=120.0, clock=clock), loop, clock


def _req(rid: str) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_new_tokens=4))


def test_kv_nobody_attaches_to_is_aborted_after_its_lease(env):
    worker, loop, clock = env
    worker.admit_prompt(_req("a"))
    clock.now += 29.9
    assert worker.reap() == 0 and "a" in worker.slots
    clock.now += 0.2
    assert worker.reap() == 1
    assert "a" not in worker.slots and loop.aborted == ["a"]


def test_attached_kv_outlives_its_lease(env):
    worker, loop, clock = env
    worker.admit_prompt(_req("a"))
    assert worker.try_attach("a", 0) == "stream-of-a"
    clock.now += 3600
    assert worker.reap() == 0 and "a" in worker.slots
    with pytest.raises(AlreadyExists):
        worker.try_attach("a", 0)        # one listener per request


def test_abort_before_the_kv_leaves_a_tombstone_that_refuses_it(env):
    worker, loop, clock = env
    worker.abort("late")
    with pytest.raises(NotFound):
        worker.admit_prompt(_req("late"))
    with pytest.raises(NotFound):
        worker.try_attach("late", 0)
    assert loop.submitted == []          # the late request never reached the engine


def test_tombstones_are_forgotten_after_their_time(env):
    worker, loop, clock = env
    worker.abort("old")
    clock.now += 119
    worker.reap()
    assert "old" in worker.tombstones
    clock.now += 2
    worker.reap()
    assert "old" not in worker.tombstones
    worker.admit_prompt(_req("old"))     # the id may be used again
    assert loop.submitted == ["old"]


def test_release_frees_the_slot_and_aborts_in_the_engine(env):
    worker, loop, clock = env
    worker.admit_prompt(_req("a"))
    worker.try_attach("a", 0)
    worker.release("a")
    assert "a" not in worker.slots and loop.aborted == ["a"] and "a" not in worker.tombstones


def test_attach_waits_no_longer_than_asked(env):
    worker, loop, clock = env
    assert worker.try_attach("never", 0.05) is None


def test_an_abort_of_attempts_up_to_n_refuses_those_and_serves_a_later_one(env):
    """A request migrated away (the router aborts its attempts up to n here) may come back with a
    later attempt when its other workers failed too: its K/V, prompt and listener are taken then; an
    abort of the whole request (attempt 0) refuses every attempt."""
    worker, loop, clock = env
    first = _req("a")
    first.attempt = 1
    worker.admit_prompt(first)
    assert worker.abort("a", attempt=1) and loop.aborted == ["a"] and "a" not in worker.slots
    with pytest.raises(NotFound):
        worker.check_header("a", None, (2, 2, 2, 3, 4), 3, SamplingParams(), attempt=1)   # its late K/V
    with pytest.raises(NotFound):
        worker.try_attach("a", 0, attempt=1)
    worker.check_header("a", None, (2, 2, 2, 3, 4), 3, SamplingParams(), attempt=2)
    again = _req("a")
    again.attempt = 2
    worker.admit_prompt(again)
    assert worker.try_attach("a", 0, attempt=2) == "stream-of-a"
    assert not worker.abort("a", attempt=1) and loop.aborted == ["a"] and "a" in worker.slots   # a later attempt's row stays
    assert worker.abort("a") and loop.aborted == ["a", "a"]                                  # the request is over
    with pytest.raises(NotFound):
        worker.try_attach("a", 0, attempt=3)
