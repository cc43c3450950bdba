"""A burst of more requests than a worker's old 64 gRPC threads: every one completes exact, no
worker is taken for dead. (Each request held a thread on its decode worker, and a colocated
worker's Prefill call another; a full pool starved the health check, the router marked the worker
dead and failed the requests: 193 of 256 on a GPU at --max-batch 128.)"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from loopback import loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, engine_greedy, save_tiny, tiny_llama

BURST = 200


@pytest.mark.slow(25)
@pytest.mark.parametrize("colocated", [0, 1], ids=["disaggregated", "colocated"])
def test_a_burst_past_the_old_thread_pool_completes_and_no_worker_is_marked_dead(tmp_path, colocated):
    rng = random.Random(5)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(4, 60))] for _ in range(BURST)]
    with loopback_cluster(save_tiny(tmp_path / "model"), colocated=colocated, worker_args=["--max-batch", "64"]) as c, \
            RouterClient(c["router"].address) as client, ThreadPoolExecutor(BURST) as pool:
        outs = list(pool.map(lambda p: client.complete(p, max_new_tokens=48, ignore_eos=True, timeout=120)[1], prompts))
        stats, status = client.stats(), client.status()
    assert outs == engine_greedy(tiny_llama(), prompts, 48)
    assert stats.failed == 0 and stats.migrations == 0
    assert all(w.alive for w in status.workers)
    assert not [line for p in c["procs"] for line in p.log if "marked dead" in line]
