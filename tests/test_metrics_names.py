"""vLLM's metric names next to baton's: the dashboard in deploy/grafana/baton.json queries only names
/metrics exports, labelled model_name; token counts and the KV-cache usage ratio are right.
One loopback cluster (router + 1 colocated worker process) and an in-process HTTP gateway."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import pytest

from baton.v1 import router_pb2
from router import metrics, metrics_scrape

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "baton.json"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "http.md"

# The vllm: series vLLM's own Grafana dashboards query, as PromQL names them: its repository's
# examples/online_serving/prometheus_grafana/grafana.json (now examples/observability/prometheus_grafana/),
# and the dashboards under examples/observability/dashboards/grafana/ (overview, performance and query
# statistics, KV cache, instances, service status), read for this list; the same names are in vLLM's
# tests/entrypoints/openai/test_metrics.py EXPECTED_METRICS_V1.
VLLM_DASHBOARD_NAMES = {
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_bucket", "vllm:inter_token_latency_seconds_sum",
    "vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket", "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum", "vllm:request_inference_time_seconds_sum",
    "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket", "vllm:request_max_num_generation_tokens_sum",
    "vllm:request_params_max_tokens_sum", "vllm:num_preemptions_total", "vllm:cache_config_info",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:iteration_tokens_total_bucket",
}
# Those baton does not export, each listed in docs/http.md with the reason.
NOT_EXPORTED = {"vllm:iteration_tokens_total_bucket"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left after dropping strings, label
    matchers, ranges and grouping clauses, that are not function calls or operators."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = re.findall(r"(?<![\w:$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", e)
    return {n for n in names if n not in ("and", "or", "unless", "bool", "offset", "group_left", "group_right")}


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all(exprs)
    names = set().union(*map(promql_metric_names, exprs))
    for v in dash["templating"]["list"]:   # label_values(metric, label)
        names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", json.dumps(v.get("query", ""))))
    return names


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_promql_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket'
            '{model_name=~"$model_name"}[$__rate_interval]))) / on (job) group_left max(baton_running) '
            '+ sum without (instance) (vllm:num_requests_waiting offset 5m)')
    assert promql_metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "baton_running",
                                         "vllm:num_requests_waiting"}


def test_dashboard_queries_the_promised_panels():
    names = dashboard_metric_names()
    for n in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
              "vllm:time_per_output_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc",
              "vllm:request_success_total"):
        assert n in names, n
    text = DASHBOARD.read_text()
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text
    assert "by (finished_reason)" in text


def test_observe_request_fills_vllm_names_with_the_model_label():
    metrics.set_model_name("unit-model")
    lab = {"model_name": "unit-model"}
    v = metrics.REGISTRY.get_sample_value
    before = {n: v(n, lab) for n in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                                     "vllm:request_queue_time_seconds_count", "vllm:request_prompt_tokens_sum",
                                     "vllm:time_per_output_token_seconds_sum", "vllm:inter_token_latency_seconds_sum",
                                     "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_sum")}
    stop = v("vllm:request_success_total", {**lab, "finished_reason": "stop"})
    baton_prompt = v("baton_prompt_tokens_total")
    r = router_pb2.GenerateResponse(finish_reason=2, ttft_s=0.1, e2e_s=0.5, queue_s=0.02, request_id="names-1")
    r.usage.prompt_tokens, r.usage.completion_tokens = 11, 5
    metrics.observe_request(r)
    assert v("vllm:prompt_tokens_total", lab) == before["vllm:prompt_tokens_total"] + 11
    assert v("baton_prompt_tokens_total") == baton_prompt + 11
    assert v("vllm:generation_tokens_total", lab) == before["vllm:generation_tokens_total"] + 5
    assert v("vllm:request_queue_time_seconds_count", lab) == before["vllm:request_queue_time_seconds_count"] + 1
    assert v("vllm:request_prompt_tokens_sum", lab) == before["vllm:request_prompt_tokens_sum"] + 11
    assert v("vllm:request_success_total", {**lab, "finished_reason": "stop"}) == stop + 1
    for n in ("vllm:time_per_output_token_seconds_sum", "vllm:inter_token_latency_seconds_sum"):
        assert v(n, lab) - before[n] == pytest.approx(0.1, rel=1e-3), n   # (0.5 - 0.1) / (5 - 1)
    assert v("vllm:time_to_first_token_seconds_count", lab) == before["vllm:time_to_first_token_seconds_count"] + 1
    assert v("vllm:e2e_request_latency_seconds_sum", lab) - before["vllm:e2e_request_latency_seconds_sum"] == \
        pytest.approx(0.5)


def _servicer(workers: dict, running=2, waiting=1):
    stats = router_pb2.StatsResponse(running=running, waiting=waiting)
    return SimpleNamespace(stats_pb=lambda: stats, model_name="/models/m1",
                           registry=SimpleNamespace(workers=workers, lock=threading.Lock()))


def test_kv_cache_usage_ratio_over_decode_workers():
    w = lambda role, used, held, alive=True: SimpleNamespace(  # noqa: E731
        role=role, worker_id=f"{role}{used}", load=0, alive=alive,
        stats={"kv_used_bytes": used, "kv_cache_bytes": held})
    workers = {"p": w("prefill", 0, 5000), "d": w("decode", 1000, 4000), "c": w("colocated", 500, 1000),
               "dead": w("decode", 9, 9, alive=False)}
    metrics.set_model_name("unit-model")
    s = samples(metrics_scrape.exposition(metrics_scrape.ServicerCollector(_servicer(workers), refresh=False)).decode())
    assert s['vllm:kv_cache_usage_perc{model_name="unit-model"}'] == pytest.approx(1500 / 5000)
    assert s["baton_kv_cache_usage_ratio"] == pytest.approx(0.3)
    assert s['vllm:num_requests_running{model_name="unit-model"}'] == 2
    assert s['vllm:num_requests_waiting{model_name="unit-model"}'] == 1
    empty = samples(metrics_scrape.exposition(metrics_scrape.ServicerCollector(_servicer({}), refresh=False)).decode())
    assert empty["baton_kv_cache_usage_ratio"] == 0


# ---- through a cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from loopback import loopback_cluster
    from router.http_gateway import start_gateway
    from tiny_model import save_tokenizer
    from tiny_model import save_tiny
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(model_dir)
    with loopback_cluster(model_dir, colocated=1, router_args=["--metrics-port", "0"]) as c:
        router = c["router"]
        metrics_addr = next(line.split("=", 1)[1].strip() for line in router.log if line.startswith("BATON_METRICS"))
        gw = start_gateway(router.address, "127.0.0.1", 0)
        try:
            yield {"url": f"http://127.0.0.1:{gw.port}", "router_metrics": f"http://{metrics_addr}/metrics"}
        finally:
            gw.stop()


def test_the_warm_up_counts_nowhere(env):
    """The router's start-up warm-up (one real generation before SERVING) is in no book and no metric:
    before any request the router's own /metrics reads zero completed, zero successes, no TTFT sample."""
    s = samples(httpx.get(env["router_metrics"], timeout=10).text)
    assert s['baton_requests_total{outcome="completed"}'] == 0
    assert sum(v for k, v in s.items() if k.startswith("vllm:request_success_total")) == 0
    assert s.get('vllm:time_to_first_token_seconds_count{model_name="model"}', 0) == 0
    assert s.get("baton_ttft_seconds_count", 0) == 0
    assert s.get('vllm:prompt_tokens_total{model_name="model"}', 0) == 0


def test_one_generation_fills_every_dashboard_metric(env):
    key = 'vllm:prompt_tokens_total{model_name="model"}'
    scrape = lambda url: httpx.get(url, timeout=10).text  # noqa: E731
    before = {u: samples(scrape(u)).get(key, 0.0) for u in (env["url"] + "/metrics", env["router_metrics"])}
    r = httpx.post(env["url"] + "/v1/completions", timeout=60, json={
        "model": "model", "prompt": "w50 w51 w52 w53", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == 4
    wanted = dashboard_metric_names()
    for url in (env["url"] + "/metrics", env["router_metrics"]):   # the gateway's, and the router process's own
        text = scrape(url)
        assert wanted <= sample_names(text), (url, wanted - sample_names(text))
        s = samples(text)
        vllm = [k for k in s if k.startswith("vllm:")]   # (this process's unit tests add "unit-model" series)
        assert vllm and all("model_name=" in k for k in vllm), [k for k in vllm if "model_name" not in k]
        for n in wanted - {"baton_requests_total", "baton_kv_transfer_seconds_bucket"}:
            assert any(k.startswith(n + "{") and 'model_name="model"' in k for k in s), (url, n)
        assert s[key] - before[url] == prompt_tokens
        assert s['vllm:generation_tokens_total{model_name="model"}'] >= 5
        assert 0.0 <= s['vllm:kv_cache_usage_perc{model_name="model"}'] <= 1.0
        assert 0.0 <= s["baton_kv_cache_usage_ratio"] <= 1.0
        assert s['vllm:request_success_total{finished_reason="length",model_name="model"}'] >= 1


def test_every_vllm_dashboard_name_is_exported_or_documented_as_not(env):
    r = httpx.post(env["url"] + "/v1/completions", timeout=60, json={
        "model": "model", "prompt": ["w50 w51", "w52"], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    docs = DOCS.read_text()
    for name in NOT_EXPORTED:
        assert f"`{name.removesuffix('_bucket')}`" in docs, name   # with the reason why
    for url in (env["url"] + "/metrics", env["router_metrics"]):
        names = sample_names(httpx.get(url, timeout=10).text)
        missing = VLLM_DASHBOARD_NAMES - NOT_EXPORTED - names
        assert not missing, (url, sorted(missing))
        assert not NOT_EXPORTED & names


def test_books_and_metrics_count_the_same_requests(env):
    """`baton_requests_total{outcome="completed"}` (the router's books) and the sum of
    `vllm:request_success_total` (its metrics) count the same requests: the metrics are observed
    where the books mark a request completed, once, and never for the warm-up."""
    for body in ({"prompt": "w5 w6", "n": 2}, {"prompt": ["w7", "w8 w9"]}, {"prompt": "w10", "stream": True}):
        r = httpx.post(env["url"] + "/v1/completions", timeout=60,
                       json={"model": "model", "max_tokens": 2, "temperature": 0, **body})
        assert r.status_code == 200, r.text
    s = samples(httpx.get(env["router_metrics"], timeout=10).text)
    completed = s['baton_requests_total{outcome="completed"}']
    assert completed >= 5
    assert sum(v for k, v in s.items() if k.startswith("vllm:request_success_total")) == completed
    assert s['vllm:time_to_first_token_seconds_count{model_name="model"}'] == completed
    assert s['vllm:request_inference_time_seconds_count{model_name="model"}'] == completed
