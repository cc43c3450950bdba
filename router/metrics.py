"""Prometheus metrics of a baton deployment, in their own CollectorRegistry (REGISTRY).

Per-request histograms and counters are observed once per finished request, from its last
GenerateResponse (`observe_request`); the router calls it in-process. Gauges (running, waiting,
workers, per-worker batch size and KV cache bytes) and the request outcome counters are read at
scrape time from a live source:

- `ServicerCollector(servicer)`: the router's RouterServicer in this process (stats_pb() and its
  registry of workers) - used by `start_metrics_server(port, servicer)` (`python -m router
  --metrics-port P`);
- `RouterStatusCollector(client)`: the router's Status RPC over gRPC - used by the HTTP gateway,
  which may run in another process.

`exposition(collector)` renders REGISTRY plus one such collector in the Prometheus text format.
"""
from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))
_KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))

TTFT = Histogram("baton_ttft_seconds", "Time to first token: request arrival at the router to its first token.",
                 buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TPOT = Histogram("baton_tpot_seconds", "Time per output token after the first: (e2e - ttft) / (completion_tokens - 1).",
                 buckets=_TPOT_BUCKETS, registry=REGISTRY)
E2E = Histogram("baton_e2e_seconds", "End-to-end latency: request arrival at the router to its last token.",
                buckets=_LATENCY_BUCKETS, registry=REGISTRY)
KV_TRANSFER = Histogram("baton_kv_transfer_seconds", "K/V transfer time prefill worker -> decode worker, per request.",
                        buckets=_KV_BUCKETS, registry=REGISTRY)
KV_BYTES = Counter("baton_kv_transfer_bytes", "K/V bytes sent from prefill workers to decode workers.",
                   registry=REGISTRY)
GENERATED = Counter("baton_generated_tokens", "Completion tokens of finished requests.", registry=REGISTRY)
FINISHED = Counter("baton_finished_requests", "Finished requests by finish reason (length, stop).",
                   ["finish_reason"], registry=REGISTRY)

HTTP_REQUESTS = Counter("baton_http_requests", "HTTP gateway requests by endpoint and status code.",
                        ["endpoint", "code"], registry=REGISTRY)

_FINISH = {1: "length", 2: "stop"}
_lock = threading.Lock()
_seen_by_router: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent request ids
_SEEN_MAX = 8192


def observe_request(last, source: str = "router") -> None:
    """Record one finished request from its last GenerateResponse (usage, ttft_s, e2e_s, kv_*).

    The router calls it in-process just before it sends that response. The HTTP gateway calls it
    with source="gateway" for each last response it relays; that is skipped when a router in this
    same process has already observed that request id (it always observes first), so a gateway
    and a router sharing a process (`baton up --http-port`) count each request once, and a gateway
    in a process of its own still fills the histograms."""
    rid = getattr(last, "request_id", "")
    with _lock:
        if source == "router":
            if rid:
                _seen_by_router[rid] = None
                while len(_seen_by_router) > _SEEN_MAX:
                    _seen_by_router.popitem(last=False)
        elif rid and rid in _seen_by_router:
            del _seen_by_router[rid]
            return
    try:
        completion = int(last.usage.completion_tokens)
        ttft, e2e = float(last.ttft_s), float(last.e2e_s)
        if ttft > 0:
            TTFT.observe(ttft)
        if e2e > 0:
            E2E.observe(e2e)
        if completion > 1 and e2e >= ttft > 0:
            TPOT.observe((e2e - ttft) / (completion - 1))
        if last.kv_bytes:
            KV_BYTES.inc(int(last.kv_bytes))
            KV_TRANSFER.observe(max(0.0, float(last.kv_transfer_s)))
        GENERATED.inc(completion)
        FINISHED.labels(_FINISH.get(int(last.finish_reason), "stop")).inc()
    except Exception:  # metrics must never break a request
        log.exception("observe_request failed")


# ---- scrape-time gauges ----------------------------------------------------------------------------
_OUTCOMES = ("completed", "failed", "cancelled", "rejected")


def _families(stats, workers: Iterable) -> list[Metric]:
    """Metric families from a StatsResponse and worker records (.role, .worker_id, .stats dict, .alive)."""
    out: list[Metric] = []
    req = CounterMetricFamily("baton_requests", "Requests by outcome (completed, failed, cancelled, rejected).",
                              labels=["outcome"])
    for o in _OUTCOMES:
        req.add_metric([o], float(getattr(stats, o, 0)))
    out.append(req)
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
        self.stats = {"running": info.running, "waiting": info.waiting, "batch_width": info.batch_width,
                      "kv_cache_bytes": info.kv_cache_bytes, "kv_used_bytes": getattr(info, "kv_used_bytes", 0)}


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
        yield from _families(s.stats_pb(), workers)


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
        yield from _families(st.stats, [_WorkerView(w) for w in st.workers])


class _Combined:
    def __init__(self, *collectors):
        self.collectors = [c for c in collectors if c is not None]

    def collect(self):
        for c in self.collectors:
            yield from c.collect()


def exposition(*collectors) -> bytes:
    """REGISTRY plus the given collectors, in the Prometheus text format."""
    return generate_latest(_Combined(REGISTRY, *collectors))


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
