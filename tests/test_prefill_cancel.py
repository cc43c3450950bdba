"""Issue 13: when the router gives up on a prefill (the client went away, or a worker was marked
dead) the prefill worker stops pushing that request's K/V at once, instead of holding it (and a
decode worker's receive) until the transfer's own deadline."""
from __future__ import annotations

import time

import grpc
import pytest

from deploy.procs import wait_for
from baton.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from loopback import kv_transports, loopback_cluster
from router.client import RouterClient
from tiny_model import save_tiny

pytestmark = pytest.mark.timeout(120)
# The router's warm-up pushes the 1st K/V chunk; the 2nd (the test's request) stalls for the
# transfer deadline + 1 s (baton/faults.py): 21 s unless the push is cancelled.
STALL = {"BATON_FAULTS": "kv_stall:2", "BATON_FAULTS_TRANSFER_TIMEOUT_S": "20"}


def _stats(stub_cls, address: str):
    with grpc.insecure_channel(address) as ch:
        return stub_cls(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5)


def _running(stub_cls, address: str) -> int:
    s = _stats(stub_cls, address)
    return s.running + s.waiting


# nixl (issue 21): the stall comes after the decode worker has read the K/V, while the call is still
# open; the cancel must free the staging buffer there and the lent region here, at once.
@pytest.mark.parametrize("transport", kv_transports())
def test_a_cancelled_prefill_stops_its_kv_push(tmp_path, transport):
    model_dir = save_tiny(tmp_path / "model")
    with loopback_cluster(model_dir, prefill=1, decode=1, env=STALL, worker_args=["--kv-transport", transport]) as c, \
            RouterClient(c["router"].address) as client:
        pf, dc = c["prefill"][0].address, c["decode"][0].address
        with pytest.raises(grpc.RpcError) as e:
            client.complete([5, 6, 7, 8], max_new_tokens=4, timeout=1.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t = time.monotonic()
        wait_for(lambda: _running(prefill_pb2_grpc.PrefillStub, pf) == 0, 5, interval=0.1,
                 what="the prefill worker's push cancelled (Stats.running 0)")
        print(f"prefill worker idle {time.monotonic() - t:.2f} s after the client's deadline")
        wait_for(lambda: _running(decode_pb2_grpc.DecodeStub, dc) == 0, 5, what="decode worker idle")
        wait_for(lambda: client.stats().running == 0 and client.stats().waiting == 0, 5, what="router idle")
        for stub, address in ((prefill_pb2_grpc.PrefillStub, pf), (decode_pb2_grpc.DecodeStub, dc)):
            s = _stats(stub, address)
            assert s.kv_transport == transport and s.kv_transport_held_bytes == 0, (address, s)
