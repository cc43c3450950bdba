"""`baton up`: start (or join) Ray, the router, and the worker pools; stop them all on SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def up(args) -> int:
    import ray

    from baton.signals import announce_ready, stop_event
    from deploy import ray_node
    from deploy.cluster import Deployment
    from router import limits as request_limits
    from router.main import router_config, start_router

    t0 = time.monotonic()
    print(f"baton: starting Ray ({args.address or 'local cluster'})...", file=sys.stderr, flush=True)
    ray_node.start(args, (args.prefill_workers or 1) + (args.decode_workers or 1) + (args.colocated_workers or 0))
    holder = {}
    server, port, servicer, watcher = start_router(
        args.model, args.host, args.port, config=router_config(args), limits=request_limits.from_args(args),
        tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_root_cert=args.tls_root_cert, scaler=lambda role, n: holder["deployment"].scale(role, n))
    router_address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    deployment = holder["deployment"] = Deployment(args, router_address, servicer.registry)
    done = stop_event()
    gateway = None
    try:
        pools = ", ".join(f"{n} {role}" for role, n in deployment.sizes.items() if n)
        print(f"baton: starting {deployment.topology} workers: {pools} "
              f"({f'{deployment.gpus} GPUs' if deployment.gpus else f'CPU, {deployment.cpu_threads} threads each'})...",
              file=sys.stderr, flush=True)
        deployment.start()
        while not watcher.serving and not done.wait(0.2):
            pass
        if args.http_port:
            from router.http_gateway import config as http_config, start_gateway
            gateway = start_gateway(router_address, args.host, args.http_port, auth_token=args.auth_token,
                                    model_name=args.served_model_name, request_timeout_s=args.request_timeout,
                                    limits=http_config.from_args(args, args.max_message_bytes))
        if not done.is_set():
            print(f"baton: serving {args.model} on {args.host}:{port} "
                  f"(ready in {time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
            announce_ready("up", f"{args.host}:{port}")
        done.wait()
    finally:
        t = time.monotonic()
        print("baton: shutting down...", file=sys.stderr, flush=True)
        watcher.stopped.set()
        stopped = server.stop(1)  # in-flight streams get 1 s, then fail
        if gateway is not None:
            gateway.stop()
        deployment.shutdown()
        ray.shutdown()
        stopped.wait(1)
        print(f"baton: stopped in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    return 0
