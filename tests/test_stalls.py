"""A stalled worker must not freeze its requests (issue 13): SIGSTOP a worker with greedy streams
in flight; every stream completes with the reference tokens within a bound, through migration
(decode) or a retry (prefill), and the router's books and loads come back to zero."""
from __future__ import annotations

import concurrent.futures as cf
import random
import signal
import time

import pytest

from deploy.procs import wait_for
from loopback import loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, engine_greedy, reference_greedy, tiny_llama

pytestmark = pytest.mark.slow(50)

SILENCE_S = 2.0      # the router's --worker-silence-s in these tests
BOUND_S = 30.0       # every stream ends within this, stopped worker or not (a stop lasts STOP_S)
STOP_S = 12.0
LONG = 950          # tokens per stream in the decode stops: about 1 s on a fast machine (prompts <= 40, context 1024)


def _expected(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt: generate()'s for short streams, engine_greedy's for long ones."""
    if max_new_tokens < LONG:
        ref = tiny_llama()
        return [reference_greedy(ref, p, max_new_tokens, ignore_eos=True) for p in prompts]
    return engine_greedy(tiny_llama(), prompts, max_new_tokens)


def _run_with_a_stop(c, stopped, n: int, max_new_tokens: int, seed: int, wait_first: bool):
    """n greedy streams; once they are under way `stopped` gets SIGSTOP for STOP_S, then SIGCONT.
    Streams must outlast the wait for every first token, else the stopped worker may have sent all its
    tokens before the stop: hence LONG tokens, and (wait_first) every worker warmed up by short
    requests first, since a fresh worker's first prefill is slow (0.9 s against the 0.04 s of the
    others, in a run where the streams finished before the stop once decode got faster)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(4, 40))] for _ in range(n)]
    expected = _expected(prompts, max_new_tokens)
    with RouterClient(c["router"].address) as client, cf.ThreadPoolExecutor(n) as pool:
        if wait_first:
            list(pool.map(lambda p: list(client.generate(p, max_new_tokens=2, timeout=BOUND_S)), prompts))
        base = client.stats()
        calls = [client.generate_stream(p, max_new_tokens=max_new_tokens, ignore_eos=True, timeout=BOUND_S)
                 for p in prompts]
        firsts = [next(call) for call in calls] if wait_first else [None] * n
        t0 = time.monotonic()
        stopped.signal(signal.SIGSTOP)
        try:
            def finish(i):
                ids = list(firsts[i].token_ids) if firsts[i] else []
                ids += [t for r in calls[i] for t in r.token_ids]
                return ids, time.monotonic() - t0
            results = list(pool.map(finish, range(n)))
        finally:
            stopped.signal(signal.SIGCONT)
        for want, (ids, took) in zip(expected, results):
            assert ids == want
            assert took < STOP_S, f"a stream waited {took:.1f} s for the stopped worker"
        wait_for(lambda: (s := client.stats()).running == 0 and s.waiting == 0, 10, what="router drained")
        after = client.stats()
        assert after.completed - base.completed == n and after.failed == base.failed
        # Loads reserved at the router, and rows and K/V on every worker (the stopped one once it runs again).
        wait_for(lambda: all(w.load == 0 and w.running == 0 and w.waiting == 0 and w.kv_used_bytes == 0
                             for w in client.status().workers), 20, what="worker loads and rows back to 0")
        return after, base, max(took for _, took in results)


def test_sigstop_decode_worker_streams_migrate_exact(model_dir):
    args = ["--worker-silence-s", str(SILENCE_S)]
    with loopback_cluster(model_dir, prefill=1, decode=2, router_args=args) as c:
        after, base, worst = _run_with_a_stop(c, c["decode"][0], 8, LONG, seed=21, wait_first=True)
        assert after.migrations > base.migrations
        print(f"decode SIGSTOP: slowest stream {worst:.1f} s after the stop")


def test_sigstop_colocated_worker_streams_migrate_exact(model_dir):
    args = ["--worker-silence-s", str(SILENCE_S)]
    with loopback_cluster(model_dir, colocated=2, router_args=args) as c:
        after, base, worst = _run_with_a_stop(c, c["decode"][0], 8, LONG, seed=22, wait_first=True)
        assert after.migrations > base.migrations


def test_sigstop_prefill_worker_requests_retry_exact(model_dir):
    with loopback_cluster(model_dir, prefill=2, decode=1) as c:
        # Stopped before the requests reach it: those sent there are retried on the other one.
        after, base, worst = _run_with_a_stop(c, c["prefill"][0], 8, 20, seed=23, wait_first=False)
        assert after.prefill_retries > base.prefill_retries
        print(f"prefill SIGSTOP: slowest request {worst:.1f} s after the stop")
