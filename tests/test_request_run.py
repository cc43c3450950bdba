"""RequestRun's silence bound, without servers: it cuts a decode worker's stream only while the
router relays it, never while the request's prefill is still queued or running elsewhere."""
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
