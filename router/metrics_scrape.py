"""Prometheus metrics read at scrape time from a live source, and their exposition.

Gauges (running, waiting, workers, per-worker batch size and KV cache bytes) and the request outcome
counters come from:

- `ServicerCollector(servicer)`: the router's RouterServicer in this process (stats_pb() and its
  registry of workers) - used by `start_metrics_server(port, servicer)` (`python -m router
  --metrics-port P`);
- `RouterStatusCollector(client)`: the router's Status RPC over gRPC - used by the HTTP gateway,
  which may run in another process.

`exposition(collector)` renders router/metrics.py's REGISTRY (the per-request histograms and
counters) plus one such collector in the Prometheus text format.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from router.metrics import CONTENT_TYPE, MODEL_LABELS, REGISTRY, model_name, shared_dir
from router.registry import worker_stats

log = logging.getLogger(__name__)

_OUTCOMES = ("completed", "failed", "cancelled", "rejected")


def kv_usage(workers: Iterable) -> float:
    """K/V bytes of live rows over bytes held, summed over live decode-side workers (0 when none hold any)."""
    used = held = 0
    for w in workers:
        s = w.stats if isinstance(w.stats, dict) else {}
        if w.role in ("decode", "colocated") and getattr(w, "alive", True):
            used, held = used + s.get("kv_used_bytes", 0), held + s.get("kv_cache_bytes", 0)
    return used / held if held else 0.0


def _families(stats, workers: Iterable, model: str = "") -> list[Metric]:
    """Metric families from a StatsResponse and worker records (.role, .worker_id, .stats dict, .alive)."""
    workers = list(workers)
    m = [model_name(model)]
    v_running = GaugeMetricFamily("vllm:num_requests_running", "Queries in decode batches.", labels=MODEL_LABELS)
    v_running.add_metric(m, float(stats.running))
    v_waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Accepted queries not yet decoding.", labels=MODEL_LABELS)
    v_waiting.add_metric(m, float(stats.waiting))
    usage = kv_usage(workers)
    v_kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (baton_kv_cache_usage_ratio).",
                             labels=MODEL_LABELS)
    v_kv.add_metric(m, usage)
    kv_ratio = GaugeMetricFamily("baton_kv_cache_usage_ratio",
                                 "K/V bytes of live rows / bytes of the batch KV caches, over decode workers.")
    kv_ratio.add_metric([], usage)
    config = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's layout (value 1): one padded batch cache "
                               "per decode worker, not vLLM's blocks (baton_worker_kv_cache_bytes holds its size).",
                               labels=MODEL_LABELS + ["cache_layout"])
    config.add_metric(m + ["padded_batch"], 1.0)
    out: list[Metric] = [v_running, v_waiting, v_kv, kv_ratio, config]
    req = CounterMetricFamily("baton_requests", "Requests by outcome (completed, failed, cancelled, rejected).",
                              labels=["outcome"])
    for o in _OUTCOMES:
        req.add_metric([o], float(getattr(stats, o, 0)))
    out.append(req)
    queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the workers' prefix "
                                  "caches.", labels=MODEL_LABELS)
    hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the workers' prefix caches (not "
                               "prefilled again).", labels=MODEL_LABELS)
    stats_of = [w.stats for w in workers if isinstance(w.stats, dict)]
    queries.add_metric(m, float(sum(s.get("prefix_cache_queried_tokens", 0) for s in stats_of)))
    hits.add_metric(m, float(sum(s.get("prefix_cache_hit_tokens", 0) for s in stats_of)))
    out += [queries, hits]
    running = GaugeMetricFamily("baton_running", "Queries in decode batches.")
    running.add_metric([], float(stats.running))
    waiting = GaugeMetricFamily("baton_waiting", "Accepted queries not yet decoding.")
    waiting.add_metric([], float(stats.waiting))
    count = GaugeMetricFamily("baton_workers", "Live workers by role.", labels=["role"])
    count.add_metric(["prefill"], float(stats.prefill_workers))
    count.add_metric(["decode"], float(stats.decode_workers))
    retries = CounterMetricFamily("baton_prefill_retries", "Prefills retried on another worker.")
    retries.add_metric([], float(getattr(stats, "prefill_retries", 0)))
    migrations = CounterMetricFamily("baton_migrations", "Requests moved to another decode worker.")
    migrations.add_metric([], float(getattr(stats, "migrations", 0)))
    out += [running, waiting, count, retries, migrations]

    labels = ["worker_id", "role"]
    batch = GaugeMetricFamily("baton_worker_batch_size", "Rows in the worker's running batch.", labels=labels)
    wwait = GaugeMetricFamily("baton_worker_waiting", "Prefilled requests waiting for a row on the worker.",
                              labels=labels)
    width = GaugeMetricFamily("baton_worker_batch_width", "The batch's padded sequence length.", labels=labels)
    kv = GaugeMetricFamily("baton_worker_kv_cache_bytes", "Bytes held by the worker's batch KV cache.", labels=labels)
    kv_used = GaugeMetricFamily("baton_worker_kv_used_bytes", "K/V bytes of the worker's live rows.", labels=labels)
    load = GaugeMetricFamily("baton_worker_load", "Requests dispatched to the worker and not finished.", labels=labels)
    alive = GaugeMetricFamily("baton_worker_alive", "1 when the worker answers its health checks.", labels=labels)
    for w in workers:
        s = w.stats if isinstance(w.stats, dict) else {}
        key = [w.worker_id, w.role]
        batch.add_metric(key, float(s.get("running", 0)))
        wwait.add_metric(key, float(s.get("waiting", 0)))
        width.add_metric(key, float(s.get("batch_width", 0)))
        kv.add_metric(key, float(s.get("kv_cache_bytes", 0)))
        kv_used.add_metric(key, float(s.get("kv_used_bytes", 0)))
        load.add_metric(key, float(getattr(w, "load", 0)))
        alive.add_metric(key, 1.0 if getattr(w, "alive", True) else 0.0)
    return out + [batch, wwait, width, kv, kv_used, load, alive]


class _WorkerView:
    """A WorkerInfo message seen as a registry handle (.role, .worker_id, .stats, .load, .alive)."""

    def __init__(self, info):
        self.role, self.worker_id, self.load, self.alive = info.role, info.worker_id, info.load, info.alive
        self.stats = worker_stats(info)


class ServicerCollector:
    """Reads a RouterServicer in this process at scrape time."""

    def __init__(self, servicer, refresh: bool = True):
        self.servicer, self.refresh = servicer, refresh

    def collect(self) -> Iterable[Metric]:
        s = self.servicer
        if self.refresh and hasattr(s, "Status"):
            try:  # asks every worker for its current stats (1 s timeout each) and stores them on the handles
                from baton.v1 import router_pb2
                s.Status(router_pb2.StatusRequest(), None)
            except Exception as e:
                log.debug("worker stats refresh failed: %s", e)
        with s.registry.lock:
            workers = list(s.registry.workers.values())
        yield from _families(s.stats_pb(), workers, getattr(s, "model_name", ""))


class RouterStatusCollector:
    """Reads the router's Status RPC (workers with their stats, and the router's stats) at scrape time."""

    def __init__(self, status: Callable[[], object]):
        self.status = status  # e.g. RouterClient(...).status

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("baton_router_up", "1 when the router answered the Status RPC at this scrape.")
        try:
            st = self.status()
        except Exception as e:
            log.debug("router Status failed: %s", e)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from _families(st.stats, [_WorkerView(w) for w in st.workers], st.model)


class _Combined:
    def __init__(self, *collectors):
        self.collectors = [c for c in collectors if c is not None]

    def collect(self):
        for c in self.collectors:
            yield from c.collect()


def exposition(*collectors) -> bytes:
    """REGISTRY plus the given collectors, in the Prometheus text format. Where the deployment's
    processes share their metrics (`baton up --api-servers N`: metrics.shared_dir()), REGISTRY's
    series summed over every process that wrote them, living or gone, in place of this process's."""
    path = shared_dir()
    if path is None:
        return generate_latest(_Combined(REGISTRY, *collectors))
    from prometheus_client import CollectorRegistry, multiprocess
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed, path)
    return generate_latest(_Combined(summed, *collectors))


class MetricsServer:
    def __init__(self, httpd, thread):
        self.httpd, self.thread = httpd, thread
        self.port = httpd.server_address[1]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(2)


def start_metrics_server(port: int, servicer=None, host: str = "127.0.0.1") -> MetricsServer:
    """Serve GET /metrics (REGISTRY + the servicer's gauges) on host:port (0 = a free port) in a daemon thread."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    collector = ServicerCollector(servicer) if servicer is not None else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = exposition(collector)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    t.start()
    return MetricsServer(httpd, t)
