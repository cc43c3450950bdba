"""Chaos (issue 13): faults injected into K/V transfers and worker calls (baton/faults.py) never
give OK with wrong tokens, never hang, fail only with a clear code, and leak nothing."""
from __future__ import annotations

import concurrent.futures as cf
import random
import time
from collections import Counter

import grpc
import pytest
import torch

from baton.faults import Faults
from baton.kv_codec import KVAssembler, KVDamaged, checksum, encode, wire_bytes
from deploy.procs import wait_for
from baton.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from loopback import kv_transports, loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, engine_greedy, tiny_llama

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow(50)]
N, CONCURRENCY, MAX_NEW = 200, 16, 8
ARRIVAL_S = 0.05     # one request starts every 50 ms (at most CONCURRENCY in flight): a 10 s run
FAULTS = {
    "BATON_FAULTS": "kv_drop:23,kv_truncate:29,kv_corrupt:13,kv_duplicate:31,kv_stall:53,"
                    "prefill_fail:41,attach_fail:37,transfer_fail:43",
    "BATON_FAULTS_SEED": "13",
    "BATON_FAULTS_TRANSFER_TIMEOUT_S": "2",   # a stalled transfer ends after 2 s, not 30
}
CLEAR = {"UNAVAILABLE", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}


def _received(kind: str, kv: torch.Tensor) -> torch.Tensor:
    """kv sent in 3 chunks with `kind` on every chunk, assembled as the decode worker does."""
    data = wire_bytes(kv)
    asm = KVAssembler("float64", list(kv.shape), len(data), 1 << 20, checksum(data))
    for piece in Faults({kind: 1} if kind else {}, seed=1).kv_chunks(encode(data, len(data) // 3 + 1), 0.0):
        asm.add(piece)
    return asm.tensor()


@pytest.mark.parametrize("kind", ["kv_drop", "kv_truncate", "kv_corrupt", "kv_duplicate"])
def test_each_kv_fault_is_refused_as_damaged(kind):
    kv = torch.arange(60, dtype=torch.float64).view(1, 2, 3, 5, 2)
    assert torch.equal(_received("", kv), kv)
    with pytest.raises(KVDamaged):
        _received(kind, kv)


def test_every_nth_and_off_by_default():
    f = Faults({"prefill_fail": 3})
    assert [f.fire("prefill_fail") for _ in range(6)] == [False, False, True] * 2
    assert f.counts() == {"prefill_fail": 2} and not f.fire("attach_fail")
    assert Faults.from_env({}).every == {} and Faults.from_env({}).transfer_timeout_s is None
    parsed = Faults.from_env({"BATON_FAULTS": "kv_drop:7, attach_fail:23", "BATON_FAULTS_TRANSFER_TIMEOUT_S": "2"})
    assert parsed.every == {"kv_drop": 7, "attach_fail": 23} and parsed.transfer_timeout_s == 2.0
    with pytest.raises(ValueError):
        Faults({"kv_explode": 2})


def _worker_stats(c) -> list[common_pb2.WorkerStatsResponse]:
    """Stats of every prefill and decode worker, read from the workers themselves."""
    out = []
    for role, stub in (("prefill", prefill_pb2_grpc.PrefillStub), ("decode", decode_pb2_grpc.DecodeStub)):
        for w in c[role]:
            with grpc.insecure_channel(w.address) as ch:
                out.append(stub(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5))
    return out


# nixl (issue 21): the byte faults (drop, truncate, corrupt, duplicate) act on a byte stream and have
# no counterpart in a one-sided read; the stall and the call faults apply.
@pytest.mark.parametrize("transport", kv_transports())
def test_chaos_faults_never_give_wrong_tokens_or_hang_or_leak(model_dir, transport):
    rng, ref = random.Random(13), tiny_llama()
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(2, 6))] for _ in range(N)]
    with loopback_cluster(model_dir, prefill=2, decode=2, env=FAULTS, worker_args=["--kv-transport", transport]) as c, \
            RouterClient(c["router"].address) as client:
        base = client.stats()

        def one(i):
            prompt = prompts[i]
            time.sleep(max(0.0, t0 + i * ARRIVAL_S - time.monotonic()))
            try:
                ids = [t for r in client.generate(prompt, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=60)
                       for t in r.token_ids]
                return "OK", ids
            except grpc.RpcError as e:
                return e.code().name, e.details()

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(N)))
        took = time.monotonic() - t0
        outcomes = Counter(code for code, _ in results)
        fired = sum((Counter(s.faults_fired) for s in _worker_stats(c)), Counter())
        print(f"chaos: {N} requests in {took:.1f} s, outcomes {dict(outcomes)}, faults fired {dict(fired)}")
        print(Counter(str(got)[:80] for code, got in results if code != "OK").most_common(8))
        ok = [(prompt, got) for prompt, (code, got) in zip(prompts, results) if code == "OK"]
        for (prompt, got), want in zip(ok, engine_greedy(ref, [p for p, _ in ok], MAX_NEW)):
            assert got == want, f"wrong tokens for {prompt}"
        for code, got in results:
            assert code == "OK" or code in CLEAR, f"unclear failure {code}: {got}"
        assert sum(fired.values()) >= 10 and len(fired) >= (6 if transport == "grpc" else 4), fired
        # Nearly all succeed through resends, retries, migration and the router waiting for a worker
        # marked dead by one failed call, on both transports alike: 200 of 200 in each of 5 runs of
        # 2026-12-05, since a request whose two decode workers each failed it once may go back to the
        # first (its tombstone there refuses only the attempts it aborted; docs/reliability.md).
        # Margin for a loaded CI machine.
        assert outcomes["OK"] >= 0.95 * N, outcomes
        # Nothing leaks: the router's books settle, every worker's rows, queue and K/V are freed.
        wait_for(lambda: (s := client.stats()).running == 0 and s.waiting == 0, 20, what="router drained")
        after = client.stats()
        assert after.completed - base.completed == outcomes["OK"]
        wait_for(lambda: all(w.load == 0 and w.running == 0 and w.waiting == 0 and w.kv_used_bytes == 0
                             for w in client.status().workers), 40, what="router's loads and workers' rows back to 0")
        assert all(s.running == 0 and s.waiting == 0 and s.kv_used_bytes == 0 for s in _worker_stats(c))
        # and no transport holds K/V: no region lent, no staging buffer in use
        wait_for(lambda: all(s.kv_transport == transport and s.kv_transport_held_bytes == 0 for s in _worker_stats(c)),
                 5, what="every worker's transport holds no K/V")
