"""The router's health polling: a busy worker that misses one check by a timeout keeps serving;
missed checks in a row, a refused connection or NOT_SERVING take it out; a SERVING answer brings
it back."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from baton.errors import Unavailable
from router.registry import HEALTH_MISSES, Registry, WorkerHandle


class _RpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


class _Health:
    """A worker's health service answering from a script: a status name or a gRPC code."""

    def __init__(self):
        self.answers = []

    def Check(self, request, timeout):  # noqa: N802 (gRPC's name)
        a = self.answers.pop(0)
        if isinstance(a, grpc.StatusCode):
            raise _RpcError(a)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.ServingStatus.Value(a))


def _registry_with_one_worker():
    reg, health = Registry(), _Health()
    w = WorkerHandle("decode", "decode-1", 1, "n", "127.0.0.1:1", channel=None, stub=None, health=health)
    reg.workers[w.worker_id] = w
    return reg, w, health


def test_one_timed_out_check_keeps_a_busy_worker_alive_and_misses_in_a_row_do_not():
    reg, w, health = _registry_with_one_worker()
    late = grpc.StatusCode.DEADLINE_EXCEEDED
    health.answers = [late, "SERVING"] + [late] * HEALTH_MISSES
    reg.poll_health()
    assert w.alive and reg.live("decode") == [w]
    reg.poll_health()
    assert w.alive and w.health_misses == 0
    for _ in range(HEALTH_MISSES - 1):
        reg.poll_health()
        assert w.alive
    reg.poll_health()
    assert not w.alive and reg.live("decode") == []


def test_refused_or_not_serving_marks_dead_at_once_and_serving_brings_it_back():
    reg, w, health = _registry_with_one_worker()
    health.answers = [grpc.StatusCode.UNAVAILABLE, "SERVING", "NOT_SERVING", "SERVING"]
    reg.poll_health()
    assert not w.alive
    reg.poll_health()
    assert w.alive
    reg.poll_health()
    assert not w.alive
    reg.poll_health()
    assert w.alive


def test_a_worker_the_request_avoids_is_picked_only_when_no_other_is_live():
    reg = Registry()
    for wid in ("d1", "d2"):
        reg.workers[wid] = WorkerHandle("decode", wid, 1, "n", "127.0.0.1:1", channel=None, stub=None, health=None)
    assert reg.pick("decode", avoid={"d1"}).worker_id == "d2"
    assert reg.pick("decode", avoid={"d1", "d2"}).worker_id in ("d1", "d2")   # both failed it once: one again
    reg.workers["d2"].alive = False
    assert reg.pick("decode", avoid={"d1"}).worker_id == "d1"                 # the only live one
    reg.workers["d1"].alive = False
    with pytest.raises(Unavailable):
        reg.pick("decode", avoid={"d1"})


def test_calls_on_a_handle_a_restart_replaced_fail_as_a_dead_workers_never_with_an_internal_error():
    # CI once failed Status with "internal error: ValueError": it listed a decode worker's handle, the
    # worker's restart registered again (closing the old handle's channel), then Status asked the old one.
    from types import SimpleNamespace

    from baton.v1 import prefill_pb2, router_pb2
    from router.follow_link import FollowLinks, StreamEnd
    from router.request_run import RequestRun, WorkerFailed
    from router.server import RouterServicer
    from test_request_run import _LiveClient

    reg = Registry()
    info = router_pb2.WorkerInfo(role="colocated", worker_id="c1", pid=1, node="n", address="127.0.0.1:1")
    old = reg.register(info)
    info.pid, info.address = 2, "127.0.0.1:2"
    new = reg.register(info)
    assert reg.workers == {"c1": new} and not old.alive and old.health_down
    reg.workers["c1"] = old          # still listed by a Status or a health poll that began before
    router = RouterServicer(reg, None, 64, "m")
    try:
        router.Status(router_pb2.StatusRequest(), SimpleNamespace())
        reg.poll_health()
        run = RequestRun("r1", [1], None, context=_LiveClient(), registry=reg, config=router.config,
                         books=router.books, auth=router.auth, links=router.links)
        with pytest.raises(WorkerFailed):
            run._call_prefill(old, old, prefill_pb2.PrefillRequest(request_id="r1"), retry=False)
        run._abort(old)
        with pytest.raises(StreamEnd) as e:
            FollowLinks((), 5.0).attach(old, "r1", 5.0).take()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        router.links.close()
        new.channel.close()
