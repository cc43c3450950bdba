"""router.metrics without any process: per-request observations, scrape-time gauges, the /metrics server."""
from __future__ import annotations

import itertools
import threading
import urllib.request
from types import SimpleNamespace

import pytest

from baton.v1 import router_pb2
from router import metrics, metrics_scrape

_ids = itertools.count()


def _last(completion=5, ttft=0.1, e2e=0.5, kv_bytes=4096, kv_s=0.002, finish=1, rid=None):
    r = router_pb2.GenerateResponse(finish_reason=finish, ttft_s=ttft, e2e_s=e2e, kv_bytes=kv_bytes,
                                    kv_transfer_s=kv_s, request_id=rid or f"test-{next(_ids)}")
    r.usage.prompt_tokens, r.usage.completion_tokens = 3, completion
    return r


def _value(name, labels=None):
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_observe_request_fills_histograms_and_counters():
    before = {n: _value(n) for n in ("baton_ttft_seconds_count", "baton_tpot_seconds_sum", "baton_tpot_seconds_count",
                                     "baton_e2e_seconds_count", "baton_kv_transfer_seconds_count",
                                     "baton_kv_transfer_bytes_total", "baton_generated_tokens_total")}
    stop_before = _value("baton_finished_requests_total", {"finish_reason": "stop"})
    metrics.observe_request(_last(completion=5, ttft=0.1, e2e=0.5, finish=2))
    assert _value("baton_ttft_seconds_count") == before["baton_ttft_seconds_count"] + 1
    assert _value("baton_e2e_seconds_count") == before["baton_e2e_seconds_count"] + 1
    assert _value("baton_tpot_seconds_count") == before["baton_tpot_seconds_count"] + 1
    assert _value("baton_tpot_seconds_sum") - before["baton_tpot_seconds_sum"] == pytest.approx(0.1, rel=1e-3)
    assert _value("baton_kv_transfer_seconds_count") == before["baton_kv_transfer_seconds_count"] + 1
    assert _value("baton_kv_transfer_bytes_total") == before["baton_kv_transfer_bytes_total"] + 4096
    assert _value("baton_generated_tokens_total") == before["baton_generated_tokens_total"] + 5
    assert _value("baton_finished_requests_total", {"finish_reason": "stop"}) == stop_before + 1
    # one token: no time-per-output-token sample
    metrics.observe_request(_last(completion=1))
    assert _value("baton_tpot_seconds_count") == before["baton_tpot_seconds_count"] + 1


def test_router_and_gateway_in_one_process_count_once():
    n = _value("baton_e2e_seconds_count")
    r = _last()
    metrics.observe_request(r)                     # the router, in this process
    metrics.observe_request(r, source="gateway")   # the gateway relaying the same request: skipped
    assert _value("baton_e2e_seconds_count") == n + 1
    metrics.observe_request(_last(), source="gateway")   # a request this process's router never saw: counted
    assert _value("baton_e2e_seconds_count") == n + 2
    # The gateway may get the last message before the router's stream resumes and observes it: the
    # router claimed the request at admission, so the gateway skips it and it still counts once.
    r = _last()
    metrics.claim(r.request_id)
    metrics.observe_request(r, source="gateway")
    metrics.observe_request(r)
    assert _value("baton_e2e_seconds_count") == n + 3


def test_a_malformed_response_is_logged_not_raised_nor_counted(caplog):
    n = _value("baton_e2e_seconds_count")
    metrics.observe_request(object())   # a bug upstream must not fail the request it describes
    assert _value("baton_e2e_seconds_count") == n
    assert any(r.name == "router.metrics" for r in caplog.records)


def _fake_servicer():
    stats = router_pb2.StatsResponse(running=3, waiting=2, prefill_workers=1, decode_workers=2, completed=10,
                                     failed=1, cancelled=4, rejected=5, kv_bytes=99)
    workers = {
        "p0": SimpleNamespace(role="prefill", worker_id="p0", load=1, alive=True, stats={}),
        "d0": SimpleNamespace(role="decode", worker_id="d0", load=2, alive=True,
                              stats={"running": 3, "waiting": 1, "batch_width": 40, "kv_cache_bytes": 123456,
                                     "kv_used_bytes": 1000}),
        "d1": SimpleNamespace(role="decode", worker_id="d1", load=0, alive=False, stats={}),
    }
    registry = SimpleNamespace(workers=workers, lock=threading.Lock())
    return SimpleNamespace(stats_pb=lambda: stats, registry=registry)


def test_servicer_collector_gauges():
    s = _samples(metrics_scrape.exposition(metrics_scrape.ServicerCollector(_fake_servicer())).decode())
    assert s["baton_running"] == 3 and s["baton_waiting"] == 2
    assert s['baton_workers{role="prefill"}'] == 1 and s['baton_workers{role="decode"}'] == 2
    assert s['baton_requests_total{outcome="completed"}'] == 10
    assert s['baton_requests_total{outcome="rejected"}'] == 5
    assert s['baton_requests_total{outcome="cancelled"}'] == 4
    assert s['baton_worker_batch_size{role="decode",worker_id="d0"}'] == 3
    assert s['baton_worker_kv_cache_bytes{role="decode",worker_id="d0"}'] == 123456
    assert s['baton_worker_kv_cache_bytes{role="prefill",worker_id="p0"}'] == 0
    assert s['baton_worker_alive{role="decode",worker_id="d1"}'] == 0
    assert "baton_ttft_seconds_count" in s   # the registry's own metrics come along


def test_status_collector_over_a_status_message():
    st = router_pb2.StatusResponse(stats=router_pb2.StatsResponse(running=1, decode_workers=1), model="m")
    st.workers.add(role="decode", worker_id="d9", alive=True, running=1, kv_cache_bytes=777, batch_width=8)
    s = _samples(metrics_scrape.exposition(metrics_scrape.RouterStatusCollector(lambda: st)).decode())
    assert s["baton_router_up"] == 1 and s["baton_running"] == 1
    assert s['baton_worker_kv_cache_bytes{role="decode",worker_id="d9"}'] == 777
    assert s['baton_worker_batch_size{role="decode",worker_id="d9"}'] == 1

    def down():
        raise RuntimeError("router down")
    s = _samples(metrics_scrape.exposition(metrics_scrape.RouterStatusCollector(down)).decode())
    assert s["baton_router_up"] == 0 and "baton_running" not in s


def test_prefix_cache_counters_sum_the_workers_reports_through_the_gateways_status_view():
    st = router_pb2.StatusResponse(stats=router_pb2.StatsResponse(), model="m")
    st.workers.add(role="prefill", worker_id="p0", alive=True, prefix_cache_queried_tokens=100,
                   prefix_cache_hit_tokens=64)
    st.workers.add(role="decode", worker_id="d0", alive=True, prefix_cache_queried_tokens=20,
                   prefix_cache_hit_tokens=16)
    s = _samples(metrics_scrape.exposition(metrics_scrape.RouterStatusCollector(lambda: st)).decode())
    label = f'{{model_name="{metrics.model_name("m")}"}}'   # a name set earlier in this process wins
    assert s["vllm:prefix_cache_queries_total" + label] == 120
    assert s["vllm:prefix_cache_hits_total" + label] == 80


def test_start_metrics_server():
    srv = metrics_scrape.start_metrics_server(0, _fake_servicer())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            body = r.read().decode()
        for name in ("baton_ttft_seconds", "baton_tpot_seconds", "baton_e2e_seconds", "baton_kv_transfer_seconds",
                     "baton_requests_total", "baton_kv_transfer_bytes_total", "baton_generated_tokens_total",
                     "baton_running", "baton_waiting", "baton_workers", "baton_worker_batch_size",
                     "baton_worker_kv_cache_bytes"):
            assert f"# TYPE {name}" in body, name
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=5)
    finally:
        srv.stop()


def test_phase_histograms_split_e2e_as_vllm():
    """queue + prefill = TTFT, prefill + decode = inference, queue + inference = e2e (vLLM v1's phases)."""
    lab = {"model_name": metrics.model_name()}
    names = ("vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
             "vllm:request_inference_time_seconds_sum", "vllm:request_max_num_generation_tokens_sum",
             "vllm:request_params_max_tokens_count")
    before = {n: _value(n, lab) for n in names}
    r = _last(completion=5, ttft=0.3, e2e=1.0)
    r.queue_s, r.max_new_tokens = 0.1, 32
    metrics.observe_request(r)
    got = {n: _value(n, lab) - before[n] for n in names}
    assert got["vllm:request_prefill_time_seconds_sum"] == pytest.approx(0.2, rel=1e-5)
    assert got["vllm:request_decode_time_seconds_sum"] == pytest.approx(0.7, rel=1e-5)
    assert got["vllm:request_inference_time_seconds_sum"] == pytest.approx(0.9, rel=1e-5)
    assert got["vllm:request_max_num_generation_tokens_sum"] == 32 and got["vllm:request_params_max_tokens_count"] == 1


def test_a_served_name_replaces_the_routers_unused_series():
    """`baton up --served-model-name smol`: the router sets its --model's name, the gateway then `smol`;
    a name no request was observed under leaves no series behind (one model_name on the dashboards),
    one that served requests keeps them."""
    def names() -> set[str]:
        text = metrics_scrape.exposition().decode()
        return {n for n in ("unused-router-name", "served-a", "served-b") if f'model_name="{n}"' in text}
    metrics.set_model_name("unused-router-name")
    metrics.set_model_name("served-a")
    assert names() == {"served-a"}
    metrics.observe_request(_last())   # a request under served-a
    metrics.set_model_name("served-b")
    assert names() == {"served-a", "served-b"}


def test_the_warm_up_is_in_no_book():
    from baton.request import Status
    from router.books import Books
    b = Books(max_queue=4, max_running=4)
    for rid, counted in (("warmup-1", False), ("real-1", True)):
        b.admit(rid)
        b.start_running()
        b.settle(rid, True, Status.FINISHED, counted)
    running, waiting, counts = b.snapshot()
    assert (running, waiting, counts["completed"]) == (0, 0, 1)
