"""Prometheus metrics of a baton deployment, in their own CollectorRegistry (REGISTRY).

Per-request histograms and counters are observed once per finished request, from its last
GenerateResponse (`observe_request`); the router calls it in-process. Gauges and the request
outcome counters are read at scrape time from a live source (router/metrics_scrape.py).

Besides baton's own names, the metrics vLLM's Grafana dashboards query are exported under vLLM's
names and types (`vllm:time_to_first_token_seconds`, `vllm:num_requests_running`, ...), labelled
`model_name` = the served model name (`set_model_name`: the router sets its model's, the HTTP
gateway its --served-model-name). deploy/grafana/baton.json is a dashboard over them.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from baton.wire import FINISH_NAMES

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))
_TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, float("inf"))
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

PROMPT_TOKENS = Counter("baton_prompt_tokens", "Prompt tokens of finished requests.", registry=REGISTRY)

# vLLM's names and types, labelled by the served model name (see set_model_name).
MODEL_LABELS = ["model_name"]


def _vllm_histogram(name: str, doc: str, buckets) -> Histogram:
    return Histogram(name, doc, MODEL_LABELS, buckets=buckets, registry=REGISTRY)


V_TTFT = _vllm_histogram("vllm:time_to_first_token_seconds", "Time to first token (baton_ttft_seconds).",
                         _LATENCY_BUCKETS)
V_TPOT = _vllm_histogram("vllm:time_per_output_token_seconds",
                         "Time per output token after the first, one sample per request (baton_tpot_seconds).",
                         _TPOT_BUCKETS)
V_ITL = _vllm_histogram("vllm:inter_token_latency_seconds", "Mean inter-token latency, one sample per request.",
                        _TPOT_BUCKETS)
V_E2E = _vllm_histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (baton_e2e_seconds).",
                        _LATENCY_BUCKETS)
V_QUEUE = _vllm_histogram("vllm:request_queue_time_seconds",
                          "Arrival at the router to its decode worker taking the request (queue_s).", _LATENCY_BUCKETS)
V_PROMPT_LEN = _vllm_histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.", _TOKENS_BUCKETS)
V_GEN_LEN = _vllm_histogram("vllm:request_generation_tokens", "Generated tokens per finished request.",
                            _TOKENS_BUCKETS)
# vLLM's request phases (its v1 definitions, from baton's timings): queue = arrival to a decode worker
# taking the request; prefill = from then to the first token (prefill compute and the K/V transfer);
# decode = first token to last; inference = prefill + decode.
V_PREFILL_TIME = _vllm_histogram("vllm:request_prefill_time_seconds",
                                 "Prefill phase: a decode worker taking the request to its first token.",
                                 _LATENCY_BUCKETS)
V_DECODE_TIME = _vllm_histogram("vllm:request_decode_time_seconds", "Decode phase: first token to last.",
                                _LATENCY_BUCKETS)
V_INFERENCE_TIME = _vllm_histogram("vllm:request_inference_time_seconds",
                                   "Prefill and decode phases: a decode worker taking the request to its last token.",
                                   _LATENCY_BUCKETS)
V_REQ_TPOT = _vllm_histogram("vllm:request_time_per_output_token_seconds",
                             "Time per output token after the first, one sample per request (vLLM's newer name).",
                             _TPOT_BUCKETS)
V_MAX_GEN = _vllm_histogram("vllm:request_max_num_generation_tokens",
                            "The max_tokens each finished request asked for (its default filled in).", _TOKENS_BUCKETS)
V_PARAMS_MAX = _vllm_histogram("vllm:request_params_max_tokens", "The max_tokens parameter of finished requests.",
                               _TOKENS_BUCKETS)
# baton never preempts: a request in a batch stays there until it ends (the batch widens instead).
# Exported at 0 for the dashboards; a request moved off a failed worker is baton_migrations_total.
V_PREEMPTIONS = Counter("vllm:num_preemptions", "Requests preempted (always 0: baton does not preempt).", MODEL_LABELS,
                        registry=REGISTRY)
V_PROMPT = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", MODEL_LABELS, registry=REGISTRY)
V_GEN = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", MODEL_LABELS, registry=REGISTRY)
V_SUCCESS = Counter("vllm:request_success", "Finished requests by finish reason (length, stop).",
                    MODEL_LABELS + ["finished_reason"], registry=REGISTRY)

HTTP_REQUESTS = Counter("baton_http_requests", "HTTP gateway requests by endpoint and status code.",
                        ["endpoint", "code"], registry=REGISTRY)

# `baton up --api-servers N` (N > 1): the router and the N API server processes keep these metrics in
# one directory of memory-mapped files (prometheus_client's multiprocess mode, chosen by this variable
# before the first metric is made), and every API server's /metrics sums them over all the processes
# (metrics_scrape.exposition): a scrape answers the same whichever process accepted it.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_api_server: list = []   # [index, Counter] in one of those API servers


def shared_dir() -> str | None:
    """The directory the processes of one deployment share their metrics in (None: this process's own)."""
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


def serve_as_api_server(index: int) -> None:
    """This process is API server `index` of `baton up --api-servers N`: its HTTP requests are counted
    under api_server=index too, and its gateway leaves per-request metrics to the router (which
    observes every request, in the shared directory)."""
    global _gateway_observes
    _gateway_observes = False
    _api_server[:] = [str(index), Counter("baton_api_server_http_requests",
                                          "Generation requests (any status) taken by each API server process of "
                                          "`baton up --api-servers N`.", ["api_server"], registry=REGISTRY)]
    _api_server[1].labels(_api_server[0])


def api_server_index() -> str | None:
    """This process's index among the API servers of `baton up --api-servers N` (None: not one of them)."""
    return _api_server[0] if _api_server else None


def count_http(endpoint: str, status: int) -> None:
    HTTP_REQUESTS.labels(endpoint, str(status)).inc()
    if _api_server:
        _api_server[1].labels(_api_server[0]).inc()

_PER_MODEL = (V_TTFT, V_TPOT, V_ITL, V_E2E, V_QUEUE, V_PROMPT_LEN, V_GEN_LEN, V_PROMPT, V_GEN, V_PREFILL_TIME,
              V_DECODE_TIME, V_INFERENCE_TIME, V_REQ_TPOT, V_MAX_GEN, V_PARAMS_MAX, V_PREEMPTIONS)

_lock = threading.Lock()
_model_name = ""
_observed: set[str] = set()   # model names a request was observed under


def served_name(model: str) -> str:
    """A model as the router got it (a name or a directory) -> the name it is served under."""
    return Path(model).name if ("/" in model or os.sep in model) else model


def set_model_name(name: str) -> None:
    """The `model_name` label of the vllm: metrics from now on; its series start at 0. The previous
    name's series go if no request was observed under it: `baton up --served-model-name smol` sets the
    router's name (its --model's), then the gateway's, and only `smol` is served."""
    global _model_name
    with _lock:
        if not name or name == _model_name:
            return
        old, _model_name = _model_name, name
        if old and old not in _observed:
            for m in _PER_MODEL:
                m.remove(old)
            for reason in FINISH_NAMES.values():
                V_SUCCESS.remove(old, reason)
        for m in _PER_MODEL:
            m.labels(name)
        for reason in FINISH_NAMES.values():
            V_SUCCESS.labels(name, reason)


def model_name(model: str = "") -> str:
    """The label: the name set, else `model`'s served name, else "baton"."""
    return _model_name or served_name(model) or "baton"

_gateway_observes = True   # False in an API server whose router records every request (serve_as_api_server)
_seen_by_router: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent request ids
_SEEN_MAX = 8192


def claim(rid: str) -> None:
    """A router in this process admitted request `rid`: it observes it (when it settles as completed),
    a gateway in this process does not."""
    with _lock:
        _seen_by_router[rid] = None
        while len(_seen_by_router) > _SEEN_MAX:
            _seen_by_router.popitem(last=False)


def observe_request(last, source: str = "router") -> None:
    """Record one finished request from its last GenerateResponse (usage, ttft_s, e2e_s, kv_*).

    The router calls it in-process when a request settles as completed (router/request_run.py), so
    these metrics count what its books count (`baton_requests_total{outcome="completed"}`), and never
    its start-up warm-up. The HTTP gateway calls it with source="gateway" for each last response it
    relays; that is skipped for a request a router in this same process admitted (`claim`, before its
    first message), so a gateway and a router sharing a process (`baton up --http-port`) count each
    request once, and a gateway in a process of its own still fills the histograms. The API servers of
    `baton up --api-servers N` never observe (serve_as_api_server): their router does, in the files they share."""
    rid = getattr(last, "request_id", "")
    with _lock:
        if source == "router":
            if rid:
                _seen_by_router[rid] = None
                while len(_seen_by_router) > _SEEN_MAX:
                    _seen_by_router.popitem(last=False)
        elif not _gateway_observes:
            return
        elif rid and rid in _seen_by_router:
            del _seen_by_router[rid]
            return
    try:
        prompt, completion = int(last.usage.prompt_tokens), int(last.usage.completion_tokens)
        ttft, e2e, queue = float(last.ttft_s), float(last.e2e_s), float(last.queue_s)
        finish = FINISH_NAMES.get(int(last.finish_reason), "stop")
        m = model_name()
        with _lock:
            _observed.add(m)
        if ttft > 0:
            TTFT.observe(ttft)
            V_TTFT.labels(m).observe(ttft)
        if e2e > 0:
            E2E.observe(e2e)
            V_E2E.labels(m).observe(e2e)
        if completion > 1 and e2e >= ttft > 0:
            tpot = (e2e - ttft) / (completion - 1)
            TPOT.observe(tpot)
            V_TPOT.labels(m).observe(tpot)
            V_ITL.labels(m).observe(tpot)
            V_REQ_TPOT.labels(m).observe(tpot)
        if queue > 0:
            V_QUEUE.labels(m).observe(queue)
        if e2e >= ttft > 0:
            V_PREFILL_TIME.labels(m).observe(max(0.0, ttft - queue))
            V_DECODE_TIME.labels(m).observe(e2e - ttft)
            V_INFERENCE_TIME.labels(m).observe(max(0.0, e2e - queue))
        max_tokens = int(getattr(last, "max_new_tokens", 0))
        if max_tokens:
            V_MAX_GEN.labels(m).observe(max_tokens)
            V_PARAMS_MAX.labels(m).observe(max_tokens)
        if last.kv_bytes:
            KV_BYTES.inc(int(last.kv_bytes))
            KV_TRANSFER.observe(max(0.0, float(last.kv_transfer_s)))
        GENERATED.inc(completion)
        PROMPT_TOKENS.inc(prompt)
        FINISHED.labels(finish).inc()
        V_PROMPT_LEN.labels(m).observe(prompt)
        V_GEN_LEN.labels(m).observe(completion)
        V_PROMPT.labels(m).inc(prompt)
        V_GEN.labels(m).inc(completion)
        V_SUCCESS.labels(m, finish).inc()
    except Exception:  # metrics must never break a request
        log.exception("observe_request failed")
