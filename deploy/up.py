"""`baton up`: start (or join) Ray, the router, and the worker pools; stop them all on SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

log = logging.getLogger(__name__)


def up(args) -> int:
    import ray

    from baton.signals import announce_ready, stop_event
    from deploy import ray_node

    t0 = time.monotonic()
    http_sock = _bind_http(args) if args.http_port is not None else None
    print(f"baton: starting Ray ({args.address or 'local cluster'})...", file=sys.stderr, flush=True)
    ray_node.start(args, (args.prefill_workers or 1) + (args.decode_workers or 1) + (args.colocated_workers or 0))
    several = args.http_port is not None and args.api_servers > 1
    metrics_dir = _share_metrics() if several else None   # before router.metrics is imported; after Ray started
    from deploy.cluster import Deployment
    from router import limits as request_limits
    from router.main import router_config, start_router
    holder = {}
    server, port, servicer, watcher = start_router(
        args.model, args.host, args.port, config=router_config(args), limits=request_limits.from_args(args),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_root_cert=args.tls_root_cert,
        scaler=lambda role, n: holder["deployment"].scale(role, n), max_model_len=args.max_model_len,
        # --api-servers N: the router labels its observations with the API servers' name from the start (the
        # shared metrics files keep every series once made)
        served_model_name=args.served_model_name if several else None)
    router_address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    deployment = holder["deployment"] = Deployment(args, router_address, servicer.registry)
    done = stop_event()
    gateway = None
    fatal: list[str] = []   # why an API server process stopped baton up
    try:
        pools = ", ".join(f"{n} {role}" for role, n in deployment.sizes.items() if n)
        print(f"baton: starting {deployment.topology} workers: {pools} "
              f"({f'{deployment.gpus} GPUs' if deployment.gpus else f'CPU, up to {deployment.cpu_threads} threads each'})...",
              file=sys.stderr, flush=True)
        deployment.start()
        while not watcher.serving and not done.wait(0.2):
            pass
        http = {}
        if several:
            gateway = _start_api_servers(args, router_address, servicer, fatal, done, http_sock)
            http = {"http": gateway.url}
        elif args.http_port is not None:
            from router.http_gateway import config as http_config, start_gateway
            gateway = start_gateway(router_address, args.http_host or args.host, args.http_port,
                                    auth_token=args.auth_token, model_name=args.served_model_name,
                                    request_timeout_s=args.request_timeout,
                                    limits=http_config.from_args(args, args.max_message_bytes), sock=http_sock,
                                    local_router=servicer)   # Generate in process: no gRPC hop to itself
            http = {"http": gateway.url}
            servicer.api_servers = _own_api_server(gateway.url)
        if not done.is_set():
            api = f"; OpenAI API on {gateway.url}/v1" if gateway else ""
            if several:
                api += f" ({args.api_servers} API server processes)"
            print(f"baton: serving {args.model}: gRPC router on {args.host}:{port}{api} "
                  f"(ready in {time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
            announce_ready("up", f"{args.host}:{port}", **http)
        done.wait()
    finally:
        _shutdown(server, watcher, gateway, deployment, ray)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if fatal:
        print(f"baton: {fatal[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def _share_metrics() -> str:
    """A fresh directory in which the router (this process) and the API server processes keep their
    metrics (router/metrics.py's MULTIPROCESS_DIR_ENV), so that any API server's /metrics sums all of
    them. Set before router/metrics.py makes its first metric; the API servers inherit it, Ray's
    processes (started before) do not."""
    if "router.metrics" in sys.modules:
        raise RuntimeError("router.metrics was imported before the metrics directory was chosen")
    path = tempfile.mkdtemp(prefix="baton-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values = sys.modules.get("prometheus_client.values")
    if values is not None:   # imported already (by a library): metrics made from now on use the files
        values.ValueClass = values.get_value_class()
    return path


def _bind_http(args):
    """The HTTP API's socket, bound before Ray starts: a port in use is said at once (exit 1), not
    after the cluster came up, and nothing else takes the port meanwhile."""
    from router.http_gateway.listen import listen_socket
    host = args.http_host or args.host
    try:
        return listen_socket(host, args.http_port)
    except OSError as e:
        raise SystemExit(f"baton: cannot serve HTTP on {host}:{args.http_port}: {e.strerror or e}") from None


def _start_api_servers(args, router_address: str, servicer, fatal: list, done, sock):
    """--api-servers N (N > 1): N processes on one socket bound here (deploy/api_servers.py)."""
    from deploy.api_servers import ApiServers
    from router.http_gateway import config as http_config
    flags = ["--max-message-bytes", str(args.max_message_bytes)]
    flags += [f for flag, field, _, _ in http_config.HTTP_LIMIT_FLAGS for f in (flag, str(getattr(args, field)))]
    if args.served_model_name:
        flags += ["--served-model-name", args.served_model_name]
    if args.request_timeout is not None:
        flags += ["--request-timeout", str(args.request_timeout)]
    env = {k: v for k, v in os.environ.items() if k != "BATON_AUTH_TOKEN"}
    if args.auth_token:
        env["BATON_AUTH_TOKEN"] = args.auth_token

    def on_fatal(why: str) -> None:
        fatal.append(why)
        done.set()
    servers = ApiServers(router_address, args.http_host or args.host, args.http_port, args.api_servers, flags,
                         on_fatal, env=env, stopping=done, sock=sock)
    servicer.api_servers = servers.pb
    print(f"baton: starting {args.api_servers} API server processes on {servers.url}...", file=sys.stderr, flush=True)
    try:
        servers.start()
    except RuntimeError as e:   # one could not start (it said why on stderr): baton up stops, exit code 1
        on_fatal(str(e))
    return servers


def _own_api_server(url: str):
    """--api-servers 1: the HTTP API is served in this process."""
    from baton.v1 import router_pb2
    one = [router_pb2.ApiServer(index=0, pid=os.getpid(), address=url.removeprefix("http://"), alive=True)]
    return lambda: one


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
