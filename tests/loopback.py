"""A router with prefill and decode worker processes on loopback, for service tests."""
from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.procs import Proc, wait_for


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
                     colocated: int = 0):
    """`colocated` > 0 starts that many colocated workers (each serves prefill and decode) instead
    of the prefill and decode pools."""
    procs = []
    if colocated:
        prefill, decode = 0, colocated
    try:
        router = Proc(["router", "--port", "0", "--model", model_dir, *router_args], env=env)
        procs.append(router)
        common = ["--port", "0", "--model", model_dir, "--dtype", "float64", "--router", router.address,
                  "--threads", "1", "--max-batch", "8", *worker_args]
        workers = [Proc(["prefill_service", *common], env=env) for _ in range(prefill)]
        workers += [Proc(["decode_service", *common, *(["--colocated"] if colocated else [])], env=env)
                    for _ in range(decode)]
        procs += workers
        wait_for(lambda: health(router.address) == "SERVING", 60, what="router SERVING")
        yield {"router": router, "prefill": workers[:prefill], "decode": workers[prefill:], "procs": procs}
    except BaseException:
        for p in procs:  # the processes' own words, for whoever reads the failure
            print(f"---- {p.args[0]} (pid {p.pid}) ----\n" + "".join(p.log[-60:]))
        raise
    finally:
        for p in procs:
            p.stop()
