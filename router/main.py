"""Run the router as its own process (no Ray needed):

    python -m router --port 50051 --model smollm2

Workers register with it (`python -m prefill_service --router 127.0.0.1:50051`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from baton import grpc_util
from baton.model_files import load_tokenizer
from baton.signals import announce_ready, stop_event
from router import limits as request_limits, metrics
from router.health import RouterHealth
from router.limits import Limits
from router.registry import Registry
from router.server import SERVICE, RouterConfig, RouterServicer


def start_router(model: str, host: str = "127.0.0.1", port: int = 50051, *, config: RouterConfig = RouterConfig(),
                 limits: Limits = Limits(), tls_cert=None, tls_key=None, tls_root_cert=None, scaler=None,
                 health_period_s: float = 1.0, max_model_len: int = 0, served_model_name: str | None = None):
    """Start the Router service; returns (server, bound_port, servicer, health_thread).
    `max_model_len`: the context requests are checked against, when less than the model's (0 = the model's).
    `served_model_name`: the vllm: metrics' model_name label (default: the model's name)."""
    tokenizer, context = load_tokenizer(model)
    context = capped_context(context, max_model_len)
    metrics.set_model_name(served_model_name or metrics.served_name(model))   # the vllm: metrics' model_name label
    registry = Registry(tls_root_cert, tls_cert, tls_key)
    servicer = RouterServicer(registry, tokenizer, context, model, config, limits, scaler)
    server, bound = grpc_util.make_server(host, port, auth_token=config.auth_token, tls_cert=tls_cert,
                                          tls_key=tls_key, max_workers=config.handler_threads,
                                          max_message_bytes=config.max_message_bytes)
    from baton.v1 import router_pb2_grpc
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE])
    server.start()
    watcher = RouterHealth(servicer, health, SERVICE, health_period_s)
    watcher.start()
    return server, bound, servicer, watcher


def capped_context(context: int, max_model_len: int) -> int:
    """The model's context, or --max-model-len when it is set; more than the model's is refused."""
    if max_model_len < 0 or max_model_len > context:
        raise ValueError(f"--max-model-len must be in [1, {context}] (the model's max_position_embeddings), "
                         f"or 0 for that; got {max_model_len}")
    return max_model_len or context


def router_config(a) -> RouterConfig:
    if not a.worker_silence_s > 0:
        raise SystemExit(f"--worker-silence-s must be > 0, got {a.worker_silence_s}")
    if not a.worker_wait_s >= 0:
        raise SystemExit(f"--worker-wait-s must be >= 0, got {a.worker_wait_s}")
    return RouterConfig(max_queue=a.max_queue, max_running=a.max_running, auth_token=a.auth_token,
                        max_message_bytes=a.max_message_bytes, worker_silence_s=a.worker_silence_s,
                        worker_wait_s=a.worker_wait_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port, 0 = a free one (default: %(default)s)")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 or a local Hugging Face model directory: its tokenizer and context; the workers "
                        "load the weights (default: %(default)s)")
    request_limits.add_args(p)
    p.add_argument("--max-model-len", type=int, default=0,
                   help="prompt + output tokens a request may hold, when less than the model's context "
                        "(default: 0 = max_position_embeddings in its config.json)")
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="clients and workers must send this token (default: $BATON_AUTH_TOKEN, else none)")
    p.add_argument("--tls-cert", help="the router's TLS certificate, PEM (default: none, plain TCP)")
    p.add_argument("--tls-key", help="its private key, PEM (default: none)")
    p.add_argument("--tls-root-cert", help="CA that signed the workers' certificates (default: none)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus GET /metrics on this port, 0 = a free one (default: none)")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    server, port, servicer, watcher = start_router(a.model, a.host, a.port, config=router_config(a),
                                                   limits=request_limits.from_args(a), tls_cert=a.tls_cert,
                                                   tls_key=a.tls_key, tls_root_cert=a.tls_root_cert,
                                                   max_model_len=a.max_model_len)
    if a.metrics_port is not None:
        from router.metrics_scrape import start_metrics_server
        print(f"BATON_METRICS address={a.host}:{start_metrics_server(a.metrics_port, servicer, a.host).port}", flush=True)
    done = stop_event()
    announce_ready("router", f"{a.host}:{port}")
    done.wait()
    watcher.stopped.set()
    servicer.liveness.stopped.set()
    server.stop(3).wait(4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
