"""Ray for `baton up`: a local single-node cluster that listens on loopback only, or an existing
cluster joined with --address (left as its owner configured it).

How the local cluster stays on loopback (Ray 2.60; deploy/README.md, "What listens where"): Ray
binds its servers to loopback exactly when the node's IP is 127.0.0.1, the mode it uses on macOS
and Windows. GcsServer builds its gRPC server with `listen_to_localhost_only = node_ip_address ==
"127.0.0.1"` (src/ray/gcs/gcs_server.cc), and so do the raylet's node and object managers and
every core worker (the driver's and each actor's); the runtime-env agent binds the node IP, the
autoscaler monitor's metrics and the dashboard's servers bind loopback when `is_localhost(ip)`.
The node IP comes from `ray._private.services.get_node_ip_address()`, which returns loopback only
when `ray_constants.ENABLE_RAY_CLUSTER` is false (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; services.py
lines 815-819); `ray.init(_node_ip_address="127.0.0.1")` does not do it: `resolve_ip_for_localhost`
turns loopback into the machine's address (services.py line 799-801).
"""
from __future__ import annotations

import argparse
import os

from deploy.procs import free_port

LOOPBACK = "127.0.0.1"
# Read by ray._private.ray_constants at import; the processes Ray starts inherit it.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-dashboard", action="store_true",
                   help=f"start Ray's dashboard on {LOOPBACK}:8265 with a local cluster (needs ray[default]; "
                        "default: off)")


def start(args, workers: int) -> None:
    """Join --address, or start a local cluster for this process with every port on loopback."""
    import ray
    if args.address and args.address != "local":
        ray.init(address=args.address, log_to_driver=True)
        return
    dashboard = getattr(args, "ray_dashboard", False)
    if dashboard:
        from ray._private.utils import get_dashboard_dependency_error
        if get_dashboard_dependency_error() is not None:
            raise SystemExit("baton: --ray-dashboard needs Ray's dashboard packages: pip install 'ray[default]'")
    _local_only()
    # Ray starts workers at niceness 15; ours do the serving, so they must not yield the cores
    # to the router, the gateway or the clients (measured: TTFT p50 12.8 s niced vs ... s not).
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # a local cluster reports nowhere
    # Ray prestarts an idle worker process for tasks; baton runs actors only (each gets a process of
    # its own), and the idle one's ~200 wake-ups a second preempt an engine thread each on a small
    # machine (docs/benchmarks.md, "Wake-ups").
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # The autoscaler monitor's metrics port is a fixed 44217 by default: a second local cluster on
    # the machine (another baton up) would find it taken. A free one per cluster instead.
    os.environ.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
    # Logical CPUs: one per worker actor; each worker sets its own torch threads.
    ray.init(address="local", num_cpus=max(workers + 2, os.cpu_count() or 2), include_dashboard=dashboard,
             dashboard_host=LOOPBACK, log_to_driver=True, configure_logging=False)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:   # a Ray version that no longer honours the switch: refuse to serve exposed
        ray.shutdown()
        raise SystemExit(f"baton: the local Ray cluster came up on {node_ip}, not {LOOPBACK}; "
                         f"Ray {ray.__version__} ignored {_LOCAL_ONLY_ENV}=0 (see deploy/ray_node.py)")


def _local_only() -> None:
    """Make this process (and the Ray processes it starts) take loopback as the node's IP."""
    os.environ[_LOCAL_ONLY_ENV] = "0"
    from ray._private import ray_constants   # imported already if `ray` was: set what it read
    ray_constants.ENABLE_RAY_CLUSTER = False
