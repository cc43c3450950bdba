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
