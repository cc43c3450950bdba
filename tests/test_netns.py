"""A real network between workers (issue 13): prefill and decode workers in their own network
namespaces behind shaped veth links (tests/netlab.py says what is emulated and how). K/V transfer
and migration stay token-exact; a link cut mid-transfer migrates the request (a decode link, a
second decode worker up) or fails it with a clear code (the only prefill worker's link) within a
bound, never hangs; every load goes back to 0. Skipped where `ip netns` is not permitted."""
from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import grpc
import pytest

from deploy.procs import wait_for
from baton.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from netlab import net_cluster, rx_tx_bytes, why_not_permitted
from router.client import RouterClient
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow(25)]
NEW = 12
CUT_AFTER_BYTES = 150_000      # cut the receiving decode worker's link once this much K/V has arrived
BOUND_S = 30.0                 # a request whose decode link is cut ends (migrated or failed) within this


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    reason = why_not_permitted()
    if reason:
        pytest.skip(reason)
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _stats(workers) -> dict[str, common_pb2.WorkerStatsResponse]:
    """Each worker's own Stats, read through its relay (across its veth)."""
    out = {}
    for name, w in workers.items():
        stub = prefill_pb2_grpc.PrefillStub if w.role == "prefill" else decode_pb2_grpc.DecodeStub
        with grpc.insecure_channel(w.address) as ch:
            out[name] = stub(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5)
    return out


def _drained(c: RouterClient, workers) -> bool:
    """Router books and loads at 0, every worker live again in its registry (a mended link is seen at
    the next health check that gets through gRPC's reconnect backoff), every worker's rows and K/V at 0."""
    s = c.stats()
    return (s.running == 0 and s.waiting == 0 and all(w.load == 0 and w.alive for w in c.status().workers)
            and all(x.running == 0 and x.waiting == 0 and x.kv_used_bytes == 0 for x in _stats(workers).values()))


def _cut_mid_transfer(lab, ws, c: RouterClient, prompt: list[int], victim) -> tuple[str, dict]:
    """Send `prompt`; once CUT_AFTER_BYTES of its K/V reached a decode worker, set down the link of
    victim(that worker's name) and restore the link rate. Returns (whose link was cut, result) once
    the request ended, asserting it did within BOUND_S."""
    got0 = {n: rx_tx_bytes(w.proc.pid)[0] for n, w in ws.items() if w.role == "decode"}
    result: dict = {}

    def run():
        try:
            _, result["ids"], result["last"] = c.complete(prompt, max_new_tokens=NEW, ignore_eos=True, timeout=60)
        except grpc.RpcError as e:
            result["error"] = (e.code().name, e.details())

    th = threading.Thread(target=run)
    th.start()
    receiver = wait_for(lambda: next((n for n in got0 if rx_tx_bytes(ws[n].proc.pid)[0] - got0[n] > CUT_AFTER_BYTES),
                                     None), 20, interval=0.02, what="K/V arriving at a decode worker")
    cut = victim(receiver)
    lab.link(ws[cut].ns, up=False)
    t_cut = time.monotonic()
    lab.reshape("1gbit")
    th.join(BOUND_S)
    assert not th.is_alive(), f"the request hung for {BOUND_S} s after {cut}'s link was cut"
    result["after_cut"] = time.monotonic() - t_cut
    return cut, result


def test_kv_over_shaped_veth_is_exact_and_a_cut_link_migrates_or_fails_clearly(model_dir):
    t0 = time.monotonic()
    ref, rng = tiny_llama(), random.Random(7)
    prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (3, 17, 64, 200, 450, 600)]
    roles = {"pf": "prefill", "d1": "decode", "d2": "decode"}
    with net_cluster(model_dir, roles, rate="1gbit", delay_ms=1.0, worker_args=["--lease-s", "5"]) as (lab, router, ws), \
            RouterClient(router.address) as c:
        print(f"{lab.emulated}; cluster up at {time.monotonic() - t0:.1f} s")
        # 1. K/V crosses the veths (the prefill worker's link carried it) and decoding is exact.
        sent0 = rx_tx_bytes(ws["pf"].proc.pid)[1]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda p: c.complete(p, max_new_tokens=NEW, ignore_eos=True, timeout=60), prompts))
        for p, (_, ids, last) in zip(prompts, outs):
            assert ids == reference_greedy(ref, p, NEW, ignore_eos=True), f"{len(p)}-token prompt: wrong tokens"
            assert last.kv_bytes > 0 and last.kv_transfer_s > 0
        kv = sum(last.kv_bytes for _, _, last in outs)
        assert rx_tx_bytes(ws["pf"].proc.pid)[1] - sent0 >= kv, "the K/V did not leave the prefill worker's veth"
        print("transfers:", [(len(p), last.kv_bytes, round(last.kv_transfer_s, 4)) for p, (_, _, last) in zip(prompts, outs)])

        # 2. A decode worker's link cut while its K/V arrives: the request migrates, tokens exact.
        lab.reshape("2mbit")          # a 600-token transfer now takes ~2.5 s: there is a middle to cut
        prompt = prompts[-1]
        cut, result = _cut_mid_transfer(lab, ws, c, prompt, lambda receiver: receiver)
        print(f"cut {cut}'s link; request ended {result['after_cut']:.1f} s later: "
              f"{result.get('error') or ('OK, migrations', result['last'].migrations)}")
        assert "error" not in result, f"with a second decode worker up the request should migrate: {result}"
        assert result["ids"] == reference_greedy(ref, prompt, NEW, ignore_eos=True)
        assert result["last"].migrations >= 1
        assert c.stats().migrations >= 1
        # The router cancelled the Prefill call that was pushing into the cut link: the prefill
        # worker dropped that push at once (not at its 30 s deadline), the link still down.
        wait_for(lambda: _stats({"pf": ws["pf"]})["pf"].running == 0, 5, interval=0.1,
                 what="the prefill worker's push into the cut link cancelled")
        lab.link(ws[cut].ns, up=True)
        wait_for(lambda: _drained(c, ws), 40, interval=0.5, what="everything back to 0 after the decode link cut")

        # 3. The only prefill worker's link cut mid-transfer: a clear error within the bound.
        lab.reshape("2mbit")
        cut, result = _cut_mid_transfer(lab, ws, c, prompt, lambda receiver: "pf")
        print(f"cut pf's link; request ended {result['after_cut']:.1f} s later: {result.get('error')}")
        assert result.get("error", ("OK",))[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), result

        # 4. Mended, everything drains: router books and loads, every worker's rows and K/V.
        lab.link(ws[cut].ns, up=True)
        t = time.monotonic()
        wait_for(lambda: _drained(c, ws), 40, interval=0.5, what="router loads and every worker back to 0")
        print(f"drained {time.monotonic() - t:.1f} s after the link was mended")
        _, ids, _ = c.complete(prompts[1], max_new_tokens=NEW, ignore_eos=True, timeout=30)
        assert ids == reference_greedy(ref, prompts[1], NEW, ignore_eos=True)
