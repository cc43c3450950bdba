"""RequestRun without servers: its silence bound cuts a decode worker's stream only while the
router relays it, never while the request's prefill is still queued or running elsewhere; it waits
briefly for a worker to come back; an in-flight Prefill call leaves a worker the health check finds
down, not one that another request's failed call marked dead."""
from __future__ import annotations

import time

from router.books import Books
from router.config import RouterConfig
from router.request_run import RequestRun
from baton.sampling import SamplingParams


class _Link:
    def __init__(self):
        self.heard_s, self.cut_for = 0.0, None

    def cut(self, why):
        self.cut_for = why


class _Attach:
    """A request's subscription on a Follow link: records fail() and its link's cut()."""

    def __init__(self):
        self.link, self.failed = _Link(), None

    @property
    def heard_s(self):
        return self.link.heard_s

    def fail(self, err):
        self.failed = err

    @property
    def cancelled(self):
        return self.failed is not None and self.link.cut_for is not None


def _run(silence_s: float = 1.0) -> RequestRun:
    return RequestRun("r1", [1, 2, 3], SamplingParams(), context=None, registry=None,
                      config=RouterConfig(worker_silence_s=silence_s), books=Books(8, 8), auth=None)


def test_silence_during_a_long_prefill_does_not_cut_the_stream():
    run = _run()
    run.attach = _Attach()                      # subscribed, then prefill queues behind a burst
    run.check_silence(time.monotonic() + 60)
    assert not run.attach.cancelled and not run.silent


def test_silence_while_relaying_cuts_the_stream():
    run = _run()
    run.attach = _Attach()
    run.heard_s = time.monotonic()              # what _tokens() sets when relaying starts
    run.check_silence(time.monotonic() + 0.5)
    assert not run.attach.cancelled
    run.check_silence(time.monotonic() + 2.0)
    assert run.attach.cancelled and run.silent


def test_a_link_that_keeps_talking_keeps_its_requests():
    """Keep-alives and other requests' tokens on the link count as the worker being alive."""
    run = _run()
    run.attach = _Attach()
    run.heard_s = time.monotonic() - 10         # this request has had nothing for a while
    run.attach.link.heard_s = time.monotonic()  # but its worker's link spoke just now
    run.check_silence(time.monotonic() + 0.5)
    assert not run.attach.cancelled and not run.silent


class _Registry:
    """No live worker until `live_after` pick attempts have failed."""

    def __init__(self, live_after: int):
        self.live_after, self.attempts = live_after, 0

    def pick(self, role, **kw):
        from baton.errors import Unavailable
        self.attempts += 1
        if self.attempts <= self.live_after:
            raise Unavailable(f"no live {role} worker")
        return f"{role}-worker"


class _LiveClient:
    def is_active(self):
        return True


def test_a_request_waits_briefly_for_a_worker_marked_dead_to_come_back():
    run = RequestRun("r1", [1], SamplingParams(), context=_LiveClient(), registry=_Registry(live_after=3),
                     config=RouterConfig(worker_wait_s=5.0), books=Books(8, 8), auth=None)
    assert run._pick("decode") == "decode-worker" and run.held == ["decode-worker"]


def test_no_live_worker_within_the_wait_is_unavailable():
    import pytest

    from baton.errors import Unavailable
    run = RequestRun("r1", [1], SamplingParams(), context=_LiveClient(), registry=_Registry(live_after=10 ** 9),
                     config=RouterConfig(worker_wait_s=0.2), books=Books(8, 8), auth=None)
    t = time.monotonic()
    with pytest.raises(Unavailable):
        run._pick("decode")
    assert time.monotonic() - t < 2


class _PrefillCall:
    """A Prefill call answered after `polls` result() timeouts; `during()` runs at the first one."""

    def __init__(self, polls: int, during):
        self.polls, self.during, self.cancelled, self.answered = polls, during, False, False

    def result(self, timeout):
        import grpc

        from baton.v1 import prefill_pb2
        if self.polls:
            self.polls -= 1
            self.during()
            self.during = lambda: None
            raise grpc.FutureTimeoutError()
        self.answered = True
        return prefill_pb2.PrefillResponse(num_tokens=3)

    def cancel(self):   # a no-op once answered, as gRPC's
        self.cancelled = self.cancelled or not self.answered


def _prefill_in_flight(during):
    """A request whose Prefill call is in flight on a prefill and a decode worker, `during` run while it is."""
    from types import SimpleNamespace

    from baton.v1 import prefill_pb2
    from router.registry import Registry, WorkerHandle
    reg = Registry()
    call = _PrefillCall(3, lambda: during(reg, decode))
    stub = SimpleNamespace(Prefill=SimpleNamespace(future=lambda req, timeout, metadata: call))
    prefill = WorkerHandle("prefill", "prefill-1", 1, "n", "127.0.0.1:1", channel=None, stub=stub, health=None)
    decode = WorkerHandle("decode", "decode-1", 2, "n", "127.0.0.1:2", channel=None, stub=None, health=None)
    run = RequestRun("r1", [1, 2, 3], SamplingParams(), context=_LiveClient(), registry=reg,
                     config=RouterConfig(), books=Books(8, 8), auth=None)
    return run, call, lambda: run._call_prefill(prefill, decode, prefill_pb2.PrefillRequest(request_id="r1"), False)


def test_a_worker_another_request_failed_on_keeps_this_requests_prefill():
    # Issue 21: one injected UNAVAILABLE used to make every request in flight on that worker leave
    # it and shun it for good; with two workers a second fault then left them none (UNAVAILABLE).
    run, call, prefill = _prefill_in_flight(lambda reg, decode: reg.mark_dead(decode, "another request's Attach failed"))
    assert prefill().num_tokens == 3 and not call.cancelled


def test_a_worker_the_health_check_finds_down_loses_the_prefill_in_flight():
    import grpc
    import pytest

    from router.request_run import WorkerFailed

    class _Refused:
        def Check(self, request, timeout):  # noqa: N802 (gRPC's name)
            raise type("Refused", (grpc.RpcError,), {"code": lambda self: grpc.StatusCode.UNAVAILABLE})()

    def health_poll_finds_it_down(reg, decode):
        decode.health = _Refused()
        reg.workers[decode.worker_id] = decode
        reg.poll_health()

    run, call, prefill = _prefill_in_flight(health_poll_finds_it_down)
    with pytest.raises(WorkerFailed) as e:
        prefill()
    assert e.value.role == "decode" and call.cancelled
