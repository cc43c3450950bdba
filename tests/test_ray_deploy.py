"""`baton up` on a local Ray cluster with the tiny float64 model: correctness, scaling under
load, SIGKILL of a prefill and of a decode worker under load, SIGTERM leaves nothing behind."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from deploy.procs import Proc, wait_for
from deploy.drill import Load, restarted, workers
from listening import beyond_loopback, listeners, processes, still_listening
from loopback import kill_with_work_in_flight
from tiny_model import EOS, engine_greedy, reference_greedy, save_tiny, tiny_llama

pytestmark = pytest.mark.slow(100)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    proc = Proc(["deploy.cli", "up", "--port", "0", "--model", model_dir, "--dtype", "float64",
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


def _load(client, max_new_tokens=30):
    return Load(client, threads=4, max_new_tokens=max_new_tokens, timeout_s=60,
                make_prompt=lambda rng: [rng.randrange(1, EOS) for _ in range(rng.randint(1, 50))])


def _check(load, ref, min_done=1):
    """No request failed, enough completed, and each equals its greedy tokens alone (engine_greedy)."""
    errors = [o.error for o in load.done if o.error]
    assert not errors, errors[:3]
    assert len(load.done) >= min_done
    for o, want in zip(load.done, engine_greedy(ref, [o.prompt for o in load.done], load.max_new)):
        assert o.token_ids == want


def test_generation_equals_generate(up, ref):
    p = [5, 9, 200, 31]
    assert up["client"].complete(p, max_new_tokens=20, ignore_eos=True)[1] == \
        reference_greedy(ref, p, 20, ignore_eos=True)


def test_scale_prefill_under_load(up, ref):
    c = up["client"]
    with _load(c) as load:
        assert c.scale("prefill", 3) == 3
        assert len([w for w in workers(c, "prefill") if w.alive]) == 3
        time.sleep(1)
        assert c.scale("prefill", 1) == 1
        time.sleep(1)
    _check(load, ref, min_done=4)
    assert len(workers(c, "prefill")) == 1


def test_sigkill_prefill_holding_requests_retries_them(up, ref):
    c = up["client"]
    c.scale("prefill", 2)
    before = c.stats().prefill_retries
    with _load(c) as load:
        time.sleep(1)
        victim = workers(c, "prefill")[0]
        kill_with_work_in_flight(c, victim.worker_id, victim.pid)
        time.sleep(3)
    _check(load, ref, min_done=4)
    assert c.stats().prefill_retries > before
    # Ray restarts it and it registers again under the same id.
    wait_for(lambda: restarted(c, victim), 60, what="prefill worker restarted")


def test_sigkill_decode_under_load_migrates(up, ref):
    c = up["client"]
    before = c.stats().migrations
    with _load(c, max_new_tokens=60) as load:
        wait_for(lambda: any(w.running > 0 for w in workers(c, "decode")), 20, what="a busy decode worker")
        victim = max(workers(c, "decode"), key=lambda w: w.running)
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(3)
    _check(load, ref, min_done=4)
    assert c.stats().migrations > before
    wait_for(lambda: all(w.alive for w in workers(c, "decode")), 60, what="decode worker restarted")


def test_listens_on_loopback_only(up):
    """With default flags every socket of baton up's processes (workers Ray restarted included) is on
    loopback: the disaggregated twin of tests/test_listen_loopback.py, on this module's cluster."""
    found = listeners(processes(up["proc"].pid))
    assert {"gcs_server", "raylet", "ray::WorkerActor"} <= {s.process.split()[0] for s in found}, found
    exposed = beyond_loopback(found)
    assert not exposed, "listening beyond loopback: " + ", ".join(map(str, exposed))


def test_sigterm_leaves_no_process_nor_port(up):
    proc = up["proc"]
    tree = _tree(proc.pid)
    assert len(tree) > 3  # router process, Ray's processes, worker actors
    ports = {(s.ip, s.port) for s in listeners(processes(proc.pid))}
    t = time.monotonic()
    assert proc.stop(10) == 0
    assert time.monotonic() - t < 10
    wait_for(lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 5,
             what="every process of baton up to exit")
    assert not still_listening(ports)
