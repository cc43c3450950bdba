"""`baton up`: the router in this process, workers as Ray actors.

Topology follows the hardware: where prefill and decode would share one device (a CPU-only
node, a single GPU) the workers are *colocated* (each serves both roles in one process, K/V
handed to its own batch in memory); with two GPUs or more the pools are *disaggregated*
(prefill and decode workers apart, K/V over the network). Explicit --prefill-workers /
--decode-workers always give disaggregated pools.

Starts an embedded local Ray cluster, or joins one with --address. Each worker asks for
`num_gpus=1` where the cluster has GPUs, else a share of the CPU cores (torch threads at most
that share, so workers do not oversubscribe; a decoding worker keeps fewer where its timed
decode step does not gain from them). Ray restarts a dead
worker; the worker registers again with the router on start.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid

from baton.worker_process import engine_argv

log = logging.getLogger(__name__)


class Deployment:
    def __init__(self, args, router_address: str, registry):
        import ray
        self.ray, self.args, self.router_address, self.registry = ray, args, router_address, registry
        self.pools: dict[str, list] = {"prefill": [], "decode": [], "colocated": []}
        self.ids: dict[object, str] = {}
        self.lock = threading.Lock()
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.sizes = initial_pools(args, self.gpus)
        self.topology = "colocated" if self.sizes["colocated"] else "disaggregated"
        self.cpu_threads = max(1, (os.cpu_count() or 2) // max(1, sum(self.sizes.values())))

    def _worker_argv(self, role: str, worker_id: str) -> list[str]:
        a = self.args
        argv = ["--host", a.worker_host, "--port", "0", "--model", a.model, "--dtype", a.dtype,
                "--max-batch", str(a.max_batch), "--max-queue", str(a.max_queue), "--router", self.router_address,
                "--worker-id", worker_id, "--log-level", a.log_level,
                "--kv-transport", getattr(a, "kv_transport", "grpc"), *engine_argv(a)]
        if self.gpus:
            argv += ["--device", "cuda"]
        else:
            # A worker that decodes takes its share of the cores as a ceiling and keeps the threads
            # that its measured decode step gains from (a tiny model: 1; baton/thread_choice.py).
            threads = f"auto:{self.cpu_threads}" if role != "prefill" and self.cpu_threads > 1 else str(self.cpu_threads)
            argv += ["--device", "cpu", "--threads", threads]
        if a.auth_token:
            argv += ["--auth-token", a.auth_token]
        for flag in ("tls_cert", "tls_key", "tls_root_cert"):
            if getattr(a, flag):
                argv += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        if a.tls_mutual:
            argv.append("--tls-mutual")
        return argv

    def _start(self, role: str):
        from deploy.actors import WorkerActor
        worker_id = f"{role}-{uuid.uuid4().hex[:6]}"
        opts = dict(max_restarts=-1, max_task_retries=0, name=worker_id, lifetime=None)
        opts.update({"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1})
        actor = self.ray.remote(WorkerActor).options(**opts).remote(role, self._worker_argv(role, worker_id))
        self.ids[actor] = worker_id
        return actor

    def start(self) -> None:
        for role, count in self.sizes.items():
            if count:
                self.scale(role, count)

    def scale(self, role: str, count: int, drain_timeout_s: float = 120.0) -> int:
        """Grow or shrink a pool; a removed worker first drains (takes no new work, finishes its own)."""
        if (role == "colocated") != (self.topology == "colocated"):
            from baton.errors import FailedPrecondition
            raise FailedPrecondition(
                "this deployment is colocated (each worker serves prefill and decode on its device, K/V in "
                "memory): resize it with `baton scale colocated N`, or start `baton up --prefill-workers N "
                "--decode-workers M` for separate pools" if self.topology == "colocated" else
                "this deployment has separate prefill and decode pools: scale `prefill` or `decode`")
        with self.lock:
            pool = self.pools[role]
            new = [self._start(role) for _ in range(count - len(pool))]
            self.ray.get([a.info.remote() for a in new])  # ready: serving and registered
            pool.extend(new)
            while len(pool) > count:
                self._drain_and_stop(pool.pop(), drain_timeout_s)
            return len(pool)

    def _drain_and_stop(self, actor, timeout_s: float) -> None:
        worker_id = self.ids.pop(actor)
        handle = self.registry.workers.get(worker_id)
        if handle is not None:
            handle.draining = True  # the router picks it no more; wait for what it was given
            deadline = time.monotonic() + timeout_s
            while handle.load > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        try:
            self.ray.get(actor.stop.remote(), timeout=10)
        except Exception as e:
            log.warning("worker %s did not stop cleanly: %s", worker_id, e)
        self.ray.kill(actor, no_restart=True)
        self.registry.deregister(worker_id)

    def shutdown(self) -> None:
        with self.lock:
            actors = [a for pool in self.pools.values() for a in pool]
            stops = [a.stop.remote(grace=1.0, deregister=False) for a in actors]  # the router is going too
            try:
                self.ray.get(stops, timeout=3)
            except Exception:
                pass
            for a in actors:
                self.ray.kill(a, no_restart=True)
            for pool in self.pools.values():
                pool.clear()


def initial_pools(args, gpus: int) -> dict[str, int]:
    """Pool sizes at start: explicit flags win; else colocated on one device, disaggregated on two or more."""
    if args.prefill_workers or args.decode_workers:
        return {"prefill": args.prefill_workers or 1, "decode": args.decode_workers or 1, "colocated": 0}
    if args.colocated_workers or gpus < 2:
        return {"prefill": 0, "decode": 0, "colocated": args.colocated_workers or 1}
    return {"prefill": gpus // 2, "decode": gpus - gpus // 2, "colocated": 0}
