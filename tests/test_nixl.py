"""K/V over NIXL (baton/kv_transport/nixl.py, issue 21): on CPU, UCX over shared memory between
worker processes on loopback. Exact tokens through the disaggregated topology; a cancel during a
transfer frees both sides; a decode worker killed mid-request gives a migration, a prefill worker
killed a retry elsewhere, and neither leaves K/V lent or staged; `baton status` shows the transport.
One module-scoped cluster (test_prefill_cancel and test_chaos run over NIXL too)."""
from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import grpc
import pytest
import torch

from baton import kv_transport
from baton.errors import Cancelled
from deploy.procs import wait_for
from loopback import kill_with_work_in_flight, loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, reference_greedy

try:
    kv_transport.check("nixl")
    NIXL = None
except kv_transport.TransportUnavailable as e:
    NIXL = str(e)
pytestmark = [pytest.mark.timeout(240), pytest.mark.skipif(NIXL is not None, reason=NIXL or "")]


@pytest.fixture(scope="module")
def cluster(model_dir):
    """2 prefill and 2 decode workers (a retry and a migration target each), K/V over NIXL."""
    with loopback_cluster(model_dir, prefill=2, decode=2, worker_args=["--kv-transport", "nixl"]) as c, \
            RouterClient(c["router"].address) as client:
        yield {**c, "client": client}


def _held(client) -> dict[str, int]:
    """K/V bytes each live worker's transport holds (the router's copy of their Stats is up to 1 s old:
    read the workers themselves)."""
    from baton.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
    out = {}
    for w in client.status().workers:
        if not w.alive:
            continue
        stub = (prefill_pb2_grpc.PrefillStub if w.role == "prefill" else decode_pb2_grpc.DecodeStub)
        with grpc.insecure_channel(w.address) as ch:
            out[w.worker_id] = stub(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5).kv_transport_held_bytes
    return out


def test_greedy_over_nixl_equals_generate_and_engine(cluster, tiny):
    from baton.engine.engine import Engine
    from baton.sampling import SamplingParams
    rng = random.Random(5)
    prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (1, 17, 120)]
    local = Engine(tiny).generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, loc in zip(prompts, local):
        text, ids, last = cluster["client"].complete(p, max_new_tokens=12, ignore_eos=True)
        assert ids == reference_greedy(tiny, p, 12, ignore_eos=True) == loc.output_ids
        assert last.kv_bytes == 2 * 2 * 2 * len(p) * 16 * 8 and last.finish_reason == 1
    # concurrent requests share the agents and the staging pool
    with cf.ThreadPoolExecutor(8) as pool:
        calls = {tuple(p): pool.submit(cluster["client"].complete, p, max_new_tokens=6, ignore_eos=True)
                 for p in ([rng.randrange(1, EOS) for _ in range(rng.randint(2, 60))] for _ in range(16))}
    for p, call in calls.items():
        assert call.result()[1] == reference_greedy(tiny, list(p), 6, ignore_eos=True)
    wait_for(lambda: not any(_held(cluster["client"]).values()), 5, what="no K/V held by any transport")


def test_status_shows_each_workers_transport(cluster, capsys):
    from deploy.status_view import print_status
    workers = cluster["client"].status().workers
    assert {w.kv_transport for w in workers} == {"nixl"} and len(workers) == 4
    print_status(cluster["client"].status(), as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert "kv transport" in lines[1] and sum(line.rstrip().endswith("nixl") for line in lines) == 4


def test_decode_worker_killed_mid_transfer_migrates_and_nothing_stays_lent(cluster, tiny):
    client = cluster["client"]
    victim = next(w for w in client.status().workers if w.role == "decode" and w.alive)
    p = [7, 8, 9, 10, 11]
    with cf.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.complete, p, max_new_tokens=20, ignore_eos=True, timeout=60)
        kill_with_work_in_flight(client, victim.worker_id, victim.pid)
        assert call.result()[1] == reference_greedy(tiny, p, 20, ignore_eos=True)
    # the prefill side frees a region lent to a reader that died within its grace (2 s)
    wait_for(lambda: not any(_held(client).values()), 10, what="no K/V lent or staged after the kill")


def test_prefill_worker_killed_mid_request_is_retried_elsewhere_and_nothing_stays_lent(cluster, tiny):
    client = cluster["client"]
    victim = next(w for w in client.status().workers if w.role == "prefill" and w.alive)
    before = client.stats().prefill_retries
    p = [12, 13, 14, 15]
    with cf.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.complete, p, max_new_tokens=8, ignore_eos=True, timeout=60)
        kill_with_work_in_flight(client, victim.worker_id, victim.pid)
        assert call.result()[1] == reference_greedy(tiny, p, 8, ignore_eos=True)
    assert client.stats().prefill_retries > before
    wait_for(lambda: not any(_held(client).values()), 10, what="no K/V lent or staged after the kill")


# ---- in process: both sides of a transfer that is cancelled while the call is open ---------------

def test_a_cancel_during_a_transfer_frees_both_sides_at_once():
    from baton.kv_transport.nixl import NixlReceiver, NixlTransport
    from baton.v1 import decode_pb2
    send = NixlTransport("test-send", release_grace_s=30.0)   # a grace far off: freed by the release only
    recv = NixlReceiver("test-recv", 1 << 30, "cpu")
    try:
        kv = torch.randn(2, 2, 3, 50, 16, dtype=torch.float32)
        header = decode_pb2.KVHeader(request_id="r", dtype="float32", shape=list(kv.shape))
        out = send.prepare(header, kv)
        assert send.held_bytes() == kv.numel() * 4 and list(out.frames()) == []
        # an exact read first
        got = recv.receive(header, iter(()), torch.float32, tuple(kv.shape), time.monotonic() + 5, lambda: True)
        assert torch.equal(got, kv) and recv.held_bytes() > 0
        out.finish(True)                            # answered: the source is freed at once (off the call's path)
        del got                                     # the batch let go of the staging buffer
        wait_for(lambda: send.held_bytes() == 0 and recv.held_bytes() == 0, 1, interval=0.005, what="both free")
        # then a transfer whose call is cancelled after the read, while the stream is still open
        header = decode_pb2.KVHeader(request_id="s", dtype="float32", shape=list(kv.shape))
        out = send.prepare(header, kv)
        cancelled = threading.Event()

        def frames():   # the call's stream: blocks until the caller cancels it, then ends in an error
            cancelled.wait(5)
            raise Cancelled("the call was cancelled")
            yield b""   # noqa: unreachable (a generator: nothing runs before the receiver asks)
        threading.Timer(0.2, cancelled.set).start()
        with pytest.raises(Cancelled):
            recv.receive(header, frames(), torch.float32, tuple(kv.shape), time.monotonic() + 5, lambda: True)
        assert recv.held_bytes() == 0               # the staging buffer is back in the pool
        out.finish(False)                           # the sender's call ended without an answer
        t = time.monotonic()
        wait_for(lambda: send.held_bytes() == 0, 2, interval=0.005, what="the source freed on the reader's release")
        assert time.monotonic() - t < 1.0
        # a read already cancelled is not started
        header = decode_pb2.KVHeader(request_id="u", dtype="float32", shape=list(kv.shape))
        out = send.prepare(header, kv)
        with pytest.raises(Cancelled):
            recv.receive(header, iter(()), torch.float32, tuple(kv.shape), time.monotonic() + 5, lambda: False)
        out.finish(False)
        wait_for(lambda: send.held_bytes() == 0 and recv.held_bytes() == 0, 2, interval=0.005, what="both free")
    finally:
        send.close()
        recv.close()


def test_idle_agents_spin_no_core():
    """NIXL's Python agent would start UCX's progress thread with a zero poll timeout (a core spun for
    good); the transport progresses UCX itself, only while a transfer is on."""
    from baton.kv_transport.nixl import NixlReceiver, NixlTransport
    send, recv = NixlTransport("idle-send"), NixlReceiver("idle-recv", 1 << 20, "cpu")
    try:
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.2     # a spinning thread alone takes ~1 s of it
    finally:
        send.close()
        recv.close()


def test_a_read_over_tcp_completes_on_the_lenders_own_progress(monkeypatch):
    """Over TCP a READ needs the lender's UCX progress (over shared memory it does not): with no
    progress thread, the lender's reaper gives it while the region is lent, every PROGRESS_S; a
    lender that progressed only at its idle pace (0.5 s) would miss the reads' deadline."""
    from baton.kv_transport.nixl import NixlReceiver, NixlTransport
    from baton.v1 import decode_pb2
    monkeypatch.setenv("UCX_TLS", "tcp")            # read by each agent's UCX context as it is made
    send, recv = NixlTransport("tcp-send"), NixlReceiver("tcp-recv", 1 << 30, "cpu")
    try:   # the first read also connects the two agents: it may take its time
        for i, (n, deadline_s) in enumerate(((3, 10.0), (3, 0.4), (400, 0.4))):   # then one past UCX's eager sizes
            kv = torch.randn(2, 2, 3, n, 16, dtype=torch.float32)
            header = decode_pb2.KVHeader(request_id=f"t{i}", dtype="float32", shape=list(kv.shape))
            out = send.prepare(header, kv)
            got = recv.receive(header, iter(()), torch.float32, tuple(kv.shape), time.monotonic() + deadline_s,
                               lambda: True)
            assert torch.equal(got, kv)
            out.finish(True)
            del got
        wait_for(lambda: send.held_bytes() == 0 and recv.held_bytes() == 0, 2, interval=0.005, what="both free")
    finally:
        send.close()
        recv.close()


def test_refused_at_start_where_nixl_cannot_load(monkeypatch):
    import subprocess
    import sys
    code = ("import sys; sys.modules['nixl_cu13'] = sys.modules['nixl_cu12'] = sys.modules['nixl'] = None\n"
            "from baton.worker_process import parse_args\n"
            "parse_args('prefill', ['--kv-transport', 'nixl'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NIXL cannot be loaded" in r.stderr and "--kv-transport grpc" in r.stderr
