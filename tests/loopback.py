"""A router with prefill and decode worker processes on loopback, for service tests."""
from __future__ import annotations

import contextlib
import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.launch import local_cluster, pools
from deploy.procs import wait_for


def health(address: str, service: str = "", metadata=()) -> str:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2,
                                                     metadata=metadata)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name


@contextlib.contextmanager
def loopback_cluster(model_dir: str, prefill: int = 1, decode: int = 1, router_args=(), worker_args=(), env=None,
                     colocated: int = 0, decode_beside: int = 0):
    """The tests' cluster: float64, one thread and 8 rows per worker; `colocated` > 0 starts that
    many colocated workers (each serves prefill and decode) instead of the prefill and decode pools;
    `decode_beside` adds that many decode workers to them (a mixed cluster: a colocated worker
    prefills for them and pushes the K/V over the K/V transport, as a prefill worker would).
    Yields {"router", "prefill", "decode", "procs"} once the router is SERVING ("decode": decode and
    colocated workers)."""
    flags = ["--dtype", "float64", "--threads", "1", "--max-batch", "8", *worker_args]
    workers = pools(prefill, decode, colocated, flags) + [["decode_service", *flags]] * decode_beside
    c = None
    try:
        with local_cluster(model_dir, workers, router_args, env) as c:
            wait_for(lambda: health(c.router.address) == "SERVING", 60, what="router SERVING")
            yield {"router": c.router, "prefill": c.prefill, "decode": c.decode, "procs": c.procs}
    except BaseException:
        for p in c.procs if c else ():   # the processes' own words, for whoever reads the failure
            print(f"---- {p.args[0]} (pid {p.pid}) ----\n" + "".join(p.log[-60:]))
        raise


def kv_transports() -> list:
    """The K/V transports a test runs over: grpc, and nixl where it loads (else skipped, saying why)."""
    import pytest
    from baton import kv_transport
    try:
        kv_transport.check("nixl")
        return ["grpc", "nixl"]
    except kv_transport.TransportUnavailable as e:
        return ["grpc", pytest.param("nixl", marks=pytest.mark.skip(reason=str(e)))]


def kill_with_work_in_flight(client, worker_id: str, pid: int, timeout: float = 20.0) -> None:
    """SIGSTOP a worker, wait until the router has dispatched a request to it (its load > 0), then
    SIGKILL it: the worker dies holding work, which the router must retry or migrate."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any(w.worker_id == worker_id and w.load > 0 for w in client.status().workers), timeout,
                 interval=0.01, what=f"a request dispatched to {worker_id}")
    finally:
        os.kill(pid, signal.SIGKILL)


def stop_with_a_stalled_stream(gw) -> float:
    """Stop the HTTP gateway `gw` while a client holds a stream open and reads nothing more (the server
    cannot finish that response); returns how long gw.stop() took. The reader is let go and joined."""
    import threading
    import time

    import httpx2 as httpx
    seen, release = threading.Event(), threading.Event()

    def reader():
        try:
            with httpx.stream("POST", gw.url + "/v1/completions", timeout=30,
                              json={"prompt": "w60", "max_tokens": 1000, "stream": True, "ignore_eos": True}) as r:
                for _ in r.iter_lines():
                    if not seen.is_set():
                        seen.set()
                        release.wait(10)   # a stalled reader
        except httpx.HTTPError:
            pass
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert seen.wait(10)
    t0 = time.monotonic()
    gw.stop()
    took = time.monotonic() - t0
    release.set()
    t.join(5)
    assert not t.is_alive()
    return took
