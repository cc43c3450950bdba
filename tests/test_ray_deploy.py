"""`baton up` on a local Ray cluster with the tiny float64 model: correctness, scaling under
load, SIGKILL of a prefill and of a decode worker under load, SIGTERM leaves nothing behind."""
from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import psutil
import pytest

from baton.procs import Proc, wait_for
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    proc = Proc(["baton.cli", "up", "--port", "0", "--model", model_dir, "--dtype", "float64",
                 "--prefill-workers", "1", "--decode-workers", "2", "--max-batch", "8"],
                env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=180)
    from router.client import RouterClient
    client = RouterClient(proc.address)
    try:
        yield {"proc": proc, "client": client}
    finally:
        client.close()
        tree = _tree(proc.pid)
        proc.stop(20)
        for p in tree:  # nothing may outlive `baton up`; clean up if it did, then the test fails
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()


def _tree(pid):
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ref():
    return tiny_llama()


class Load:
    """Requests in a loop from a few threads until stopped; records every outcome."""

    def __init__(self, client, ref, threads=4, max_new_tokens=30, seed=0):
        self.client, self.ref, self.max_new = client, ref, max_new_tokens
        self.rng = random.Random(seed)
        self.results, self.errors = [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i):
        rng = random.Random(i)
        while not self.stop.is_set():
            p = [rng.randrange(1, EOS) for _ in range(rng.randint(1, 50))]
            try:
                ids = self.client.complete(p, max_new_tokens=self.max_new, ignore_eos=True, timeout=60)[1]
                self.results.append((p, ids))
            except Exception as e:
                self.errors.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def check(self, min_done=1):
        assert not self.errors, self.errors[:3]
        assert len(self.results) >= min_done
        for p, ids in self.results:
            assert ids == reference_greedy(self.ref, p, self.max_new, ignore_eos=True)


def _workers(client, role):
    return [w for w in client.status().workers if w.role == role]


def test_generation_equals_generate(up, ref):
    p = [5, 9, 200, 31]
    assert up["client"].complete(p, max_new_tokens=20, ignore_eos=True)[1] == \
        reference_greedy(ref, p, 20, ignore_eos=True)


def test_scale_prefill_under_load(up, ref):
    c = up["client"]
    with Load(c, ref) as load:
        assert c.scale("prefill", 3) == 3
        assert len([w for w in _workers(c, "prefill") if w.alive]) == 3
        time.sleep(1)
        assert c.scale("prefill", 1) == 1
        time.sleep(1)
    load.check(min_done=4)
    assert len(_workers(c, "prefill")) == 1


def test_sigkill_prefill_under_load(up, ref):
    c = up["client"]
    c.scale("prefill", 2)
    with Load(c, ref) as load:
        time.sleep(1)
        victim = _workers(c, "prefill")[0]
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(3)
    load.check(min_done=4)
    # Ray restarts it and it registers again under the same id.
    wait_for(lambda: any(w.worker_id == victim.worker_id and w.alive and w.pid != victim.pid
                         for w in _workers(c, "prefill")), 60, what="prefill worker restarted")


def test_sigkill_decode_under_load_migrates(up, ref):
    c = up["client"]
    before = c.stats().migrations
    with Load(c, ref, max_new_tokens=60) as load:
        wait_for(lambda: any(w.running > 0 for w in _workers(c, "decode")), 20, what="a busy decode worker")
        victim = max(_workers(c, "decode"), key=lambda w: w.running)
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(3)
    load.check(min_done=4)
    assert c.stats().migrations > before
    wait_for(lambda: all(w.alive for w in _workers(c, "decode")), 60, what="decode worker restarted")


def test_sigterm_leaves_no_process(up):
    proc = up["proc"]
    tree = _tree(proc.pid)
    assert len(tree) > 3  # router process, Ray's processes, worker actors
    t = time.monotonic()
    assert proc.stop(10) == 0
    assert time.monotonic() - t < 10
    wait_for(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 5,
             what="every process of baton up to exit")
