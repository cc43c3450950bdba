"""`baton up`: start (or join) Ray, the router, and the worker pools; stop them all on SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import os
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
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_root_cert=args.tls_root_cert,
        scaler=lambda role, n: holder["deployment"].scale(role, n), max_model_len=args.max_model_len)
    router_address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    deployment = holder["deployment"] = Deployment(args, router_address, servicer.registry)
    done = stop_event()
    gateway = None
    try:
        pools = ", ".join(f"{n} {role}" for role, n in deployment.sizes.items() if n)
        print(f"baton: starting {deployment.topology} workers: {pools} "
              f"({f'{deployment.gpus} GPUs' if deployment.gpus else f'CPU, up to {deployment.cpu_threads} threads each'})...",
              file=sys.stderr, flush=True)
        deployment.start()
        while not watcher.serving and not done.wait(0.2):
            pass
        http = {}
        if args.http_port is not None:
            from router.http_gateway import config as http_config, start_gateway
            gateway = start_gateway(router_address, args.http_host or args.host, args.http_port,
                                    auth_token=args.auth_token, model_name=args.served_model_name,
                                    request_timeout_s=args.request_timeout,
                                    limits=http_config.from_args(args, args.max_message_bytes))
            http = {"http": gateway.url}
        if not done.is_set():
            api = f"; OpenAI API on {gateway.url}/v1" if gateway else ""
            print(f"baton: serving {args.model}: gRPC router on {args.host}:{port}{api} "
                  f"(ready in {time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
            announce_ready("up", f"{args.host}:{port}", **http)
        done.wait()
    finally:
        _shutdown(server, watcher, gateway, deployment, ray)
    return 0


def _shutdown(server, watcher, gateway, deployment, ray) -> None:
    """Stop everything at once: the router and the HTTP API stop taking calls while the workers stop
    (open streams get up to 1 s), then Ray's local cluster goes. The figure printed runs from the
    signal to the last process gone (tests/stop_time.py measures the same from outside)."""
    import threading

    from baton.signals import signalled_at
    t = signalled_at() or time.monotonic()
    print("baton: shutting down...", file=sys.stderr, flush=True)
    watcher.stopped.set()
    stopped = server.stop(1)  # in-flight streams get 1 s, then fail
    stops = [threading.Thread(target=gateway.stop, daemon=True)] if gateway is not None else []
    stops.append(threading.Thread(target=deployment.shutdown, daemon=True))
    for th in stops:
        th.start()
    for th in stops:
        th.join(5)
    log.info("shutdown: HTTP API and workers stopped %.2f s after the signal", time.monotonic() - t)
    pids = _ray_processes()
    _kill_ray_monitor(ray)
    ray.shutdown()
    stopped.wait(1)
    _wait_gone(pids, 3.0)
    log.info("shutdown: Ray's processes gone %.2f s after the signal", time.monotonic() - t)
    print(f"baton: stopped in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)


def _kill_ray_monitor(ray) -> None:
    """SIGKILL the local cluster's autoscaler monitor. ray.shutdown() stops Ray's processes one after
    another and this one outlives SIGTERM: 1.00 of the 1.6 s ray.shutdown() took was Ray waiting for it
    before it SIGKILLs it (the raylet 0.27 s, the rest 0.3 s). It holds no state. Nothing to do when this
    process joined a cluster (--address): Ray started no process here then."""
    node = getattr(ray._private.worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        if info.process.poll() is None:
            info.process.kill()


def _ray_processes() -> list:
    """This process's children and theirs (the local Ray cluster and its workers), to wait for."""
    import psutil
    try:
        return psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


def _wait_gone(procs: list, timeout_s: float) -> None:
    """Wait until every process in `procs` has exited (reaped or not), at most `timeout_s`."""
    import psutil
    deadline = time.monotonic() + timeout_s
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _running(p, psutil)]
        if procs:
            time.sleep(0.02)


def _running(p, psutil) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
