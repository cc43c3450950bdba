"""A colocated worker that prefills for another decode worker pushes the K/V over the cluster's K/V
transport (decode_service/colocated.py ColocatedPrefill -> prefill_service/kv_push.py), as a dedicated
prefill worker would (issue 21: untested over NIXL). A mixed cluster of one colocated and one decode
worker, over grpc and NIXL: the colocated worker's Prefill for the decode worker, then the decode
worker's Attach, give generate()'s greedy tokens; requests through the router, spread over both
decode sides, too; neither worker holds rows, K/V or transport memory afterwards."""
from __future__ import annotations

import concurrent.futures as cf
import random
import uuid

import grpc
import pytest

from baton.sampling import SamplingParams
from baton.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from baton.wire import params_to_pb
from deploy.procs import wait_for
from loopback import kv_transports, loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, reference_greedy

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow(25)]
MAX_NEW = 10


def _stats(address: str) -> common_pb2.WorkerStatsResponse:
    with grpc.insecure_channel(address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5)


def _prefill_there_decode_here(colocated: str, decode: str, prompt: list[int]) -> list[int]:
    """The colocated worker prefills `prompt` for the decode worker (K/V pushed over the transport);
    the decode worker streams its tokens."""
    rid = uuid.uuid4().hex
    params = params_to_pb(SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    with grpc.insecure_channel(colocated) as ch:
        pre = prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, params=params, decode_address=decode, attempt=1), timeout=30)
    assert pre.num_tokens == len(prompt) and pre.kv_bytes > 0, pre
    with grpc.insecure_channel(decode) as ch:
        chunks = decode_pb2_grpc.DecodeStub(ch).Attach(decode_pb2.AttachRequest(request_id=rid, timeout_s=10),
                                                       timeout=30)
        return [t for chunk in chunks for t in chunk.token_ids]


@pytest.mark.parametrize("transport", kv_transports())
def test_a_colocated_worker_pushes_kv_to_a_decode_worker_exactly(model_dir, tiny, transport):
    with loopback_cluster(model_dir, colocated=1, decode_beside=1, worker_args=["--kv-transport", transport]) as c, \
            RouterClient(c["router"].address) as client:
        workers = {w.role: w for w in client.status().workers}
        assert sorted(workers) == ["colocated", "decode"], workers
        colocated, decode = workers["colocated"].address, workers["decode"].address
        rng = random.Random(21)
        prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (1, 7, 33, 120)]
        before = _stats(decode).kv_transfers   # the router's warm-up may have gone there
        for p in prompts:
            assert _prefill_there_decode_here(colocated, decode, p) == reference_greedy(tiny, p, MAX_NEW, ignore_eos=True)
        pushed = _stats(decode)
        assert pushed.kv_transport == transport and pushed.kv_transfers - before == len(prompts), pushed
        # through the router, 6 at once: the least-loaded decode side takes each, the colocated worker
        # prefills them all (in memory for its own rows, pushed for the decode worker's)
        more = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 40))] for _ in range(12)]
        with cf.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: client.complete(p, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=60)[1],
                                more))
        for p, ids in zip(more, got):
            assert ids == reference_greedy(tiny, p, MAX_NEW, ignore_eos=True), f"wrong tokens for {p}"
        # nothing left: rows, K/V, no region lent by the colocated side, no staging buffer in use
        wait_for(lambda: all(s.running == 0 and s.kv_used_bytes == 0 and s.kv_transport_held_bytes == 0
                             and s.kv_transport == transport for s in (_stats(colocated), _stats(decode))),
                 10, what="both workers drained, no K/V held by a transport")
