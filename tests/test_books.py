"""Books that add up (issue 13): every request the router accepted ends in exactly one of
completed / failed / cancelled, counted in the same moment it leaves running / waiting."""
from __future__ import annotations

import json
import pathlib
import random
import threading

import pytest

from deploy.procs import wait_for
from loopback import loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama

DOOMED_TOKENS = 60_000   # what the streams cancelled mid-way ask for: they must not finish first


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def cluster(request, tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    # A long context, so the doomed streams below (DOOMED_TOKENS, minutes of decoding) cannot finish
    # before their cancel however slow the machine: a 900-token one did on a loaded CI runner.
    config = pathlib.Path(model_dir) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 1 << 16}))
    with loopback_cluster(model_dir, prefill=1, decode=1, colocated=int(request.param == "colocated"),
                          worker_args=["--max-batch", "16"]) as c, RouterClient(c["router"].address) as client:
        yield {**c, "client": client}


def _settled(s) -> int:
    return s.completed + s.failed + s.cancelled


def _start(client, prompt, max_new_tokens):
    call = client.generate_stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, timeout=60)
    first = next(call)
    return call, list(first.token_ids)


def test_every_cancel_is_counted_and_no_stats_read_loses_a_request(cluster):
    client, rng, ref = cluster["client"], random.Random(13), tiny_llama()
    base = client.stats()
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(4, 40))] for _ in range(16)]
    # The doomed ones cannot finish before their cancel; the kept ones run to 64 tokens. All 16
    # start at once, then each first token is awaited (so every Stats read below sees all 16): one
    # call at a time, the first doomed streams ran hundreds of tokens before the last one started.
    calls = [client.generate_stream(p, max_new_tokens=DOOMED_TOKENS if i < 8 else 64, ignore_eos=True, timeout=60)
             for i, p in enumerate(prompts)]
    calls = [(call, list(next(call).token_ids)) for call in calls]
    snapshots, stop = [], threading.Event()

    def watch():  # every Stats read: each of the 16 is either still counted as running/waiting or settled
        while not stop.is_set() and len(snapshots) < 5000:
            snapshots.append(client.stats())
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for call, ids in calls[:8]:
            while len(ids) < 3:
                ids += next(call).token_ids
            call.cancel()
        for (call, ids), p in zip(calls[8:], prompts[8:]):
            ids += [t for r in call for t in r.token_ids]
            assert ids == reference_greedy(ref, p, 64, ignore_eos=True)
        wait_for(lambda: (s := client.stats()).running == 0 and s.waiting == 0, 20, what="router drained")
    finally:
        stop.set()
        watcher.join(10)
    for s in snapshots:
        assert _settled(s) - _settled(base) + s.running + s.waiting == 16, s
    after = client.stats()
    assert after.cancelled - base.cancelled == 8
    assert after.completed - base.completed == 8
    assert after.failed == base.failed and after.rejected == base.rejected


def test_cancels_racing_the_last_token_are_counted_once(cluster):
    """All 16 may finish: a cancel that lands after the last token went out is a completion,
    one that lands before is a cancel; either way each request is counted exactly once."""
    client, rng = cluster["client"], random.Random(14)
    base = client.stats()
    for _ in range(3):
        calls = [_start(client, [rng.randrange(1, EOS) for _ in range(20)], 64) for _ in range(16)]
        for call, ids in calls[:8]:
            while len(ids) < 3:
                ids += next(call).token_ids
            call.cancel()
        for call, ids in calls[8:]:
            assert len(ids) + sum(len(r.token_ids) for r in call) == 64
    wait_for(lambda: (s := client.stats()).running == 0 and s.waiting == 0, 20, what="router drained")
    after = client.stats()
    assert _settled(after) - _settled(base) == 48 and after.failed == base.failed
    assert after.completed - base.completed >= 24 and after.cancelled - base.cancelled <= 24
