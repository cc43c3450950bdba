"""`python -m decode_service --port 0 --model DIR [--router 127.0.0.1:50051] [--colocated]`: one
decode (or colocated) worker as its own process (no Ray needed). Prints `BATON_READY role=decode
address=... pid=...` once it serves and is registered; stops cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import sys
import threading
import time

from baton import grpc_util
from baton.worker_process import Served, engine_config, parse_args, security, set_up_process


def build(args: argparse.Namespace) -> Served:
    """The engine loop's thread loads the model and runs it (one thread for all model work);
    a warm-up request, then the Decode service (and Prefill too when colocated)."""
    from baton.engine.engine import Engine
    from baton.engine.loop import EngineLoop
    from baton.model_loader import load_model
    from baton.request import Request
    from baton.sampling import SamplingParams
    cfg = engine_config(args)
    loop = EngineLoop(lambda: Engine(load_model(args.model, args.dtype, args.device), cfg)).start()
    list(loop.submit(Request("warmup", [1, 2, 3], SamplingParams(max_new_tokens=2))))
    threads = ""
    if getattr(args, "auto_threads", False) and loop.info.device.type == "cpu":
        from baton import thread_choice
        args.threads, note = loop.call(lambda engine: thread_choice.choose(engine, args.threads), timeout=None)
        threads = "; " + note
    print(f"baton: {args.role} worker: {loop.info.description}{threads}", file=sys.stderr, flush=True)
    server, port, worker = serve(loop, args.host, args.port, lease_s=args.lease_s,
                                     colocated=args.role == "colocated", kv_transport=args.kv_transport,
                                     worker_id=args.worker_id, **security(args))

    def stop(grace: float) -> None:
        worker.end_follows()   # a router's Follow stream with nothing on it would hold the stop for its grace
        server.stop(grace).wait(grace + 1)
        loop.stop()
        for t in worker.transports:   # registered memory goes with the worker
            t.close()
    return Served(args.role, port, stop)


def serve(loop, host: str, port: int, *, auth_token=None, tls_cert=None, tls_key=None, tls_client_ca=None,
          tls_root_cert=None, lease_s: float = 30.0, colocated: bool = False, kv_transport: str = "grpc",
          worker_id: str = "decode"):
    """Start the Decode service on a running engine loop, and its watchdog; returns the server, its
    port and the DecodeWorker (its transports: close them once the server is stopped). `colocated`:
    the same server also serves the Prefill role (ColocatedPrefill). `kv_transport`: how K/V
    reaches it (baton/kv_transport/)."""
    from baton import faults, kv_transport as transports
    from baton.v1 import decode_pb2_grpc
    from decode_service.colocated import ColocatedPrefill
    from decode_service.worker import SERVICE, STALL_S, DecodeServicer, DecodeWorker
    from prefill_service.worker import SERVICE as PREFILL_SERVICE, add_servicer, prefill_worker
    worker = DecodeWorker(loop, lease_s=lease_s)
    cfg = loop.info.config
    server, bound = grpc_util.make_server(host, port, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                                          tls_client_ca=tls_client_ca,
                                          max_workers=grpc_util.worker_threads(cfg.max_batch, cfg.max_queue))
    servicer = DecodeServicer(worker, attach_timeout_s=lease_s)
    servicer.receivers = transports.receiving(kv_transport, servicer.max_kv_bytes, loop.info.device,
                                              transports.agent_name(worker_id, "recv"), host)
    worker.transports = [servicer.receivers[kv_transport]]
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    services = [SERVICE]
    if colocated:
        # A prefill for another decode worker runs on the engine's thread too, between two steps
        # (`compute`); the prefiller handed over here serves the checks' fixed facts (vocabulary, grammars).
        remote = prefill_worker(
            loop.call(lambda engine: engine.prefiller), loop.info.max_len, auth_token=auth_token, tls_cert=tls_cert,
            tls_key=tls_key, tls_root_cert=tls_root_cert, transfer_timeout_s=faults.transfer_timeout_s(30.0),
            compute=lambda reqs: loop.call(lambda engine: engine.prefiller.prefill_many(reqs), timeout=None),
            transport=faults.wrap_transport(transports.sending(kv_transport, transports.agent_name(
                worker_id, "send"), host), faults.transfer_timeout_s(30.0)))
        worker.transports.append(remote.transport)
        servicer.colocated = ColocatedPrefill(worker, remote, f"{host}:{bound}")
        add_servicer(servicer.colocated, server)
        services.append(PREFILL_SERVICE)
    health = grpc_util.add_health_and_reflection(server, services)
    server.start()
    grpc_util.set_health(health, services, loop.alive)
    Watchdog(worker, health, services, STALL_S).start()
    return server, bound, worker


class Watchdog(threading.Thread):
    """Health follows the engine: NOT_SERVING when its loop died or stalled with work to do.
    Also reclaims K/V that nobody attached to within the lease."""

    def __init__(self, worker, health, services: list[str], stall_s: float, period_s: float = 0.5):
        super().__init__(name="decode-watchdog", daemon=True)
        self.worker, self.health, self.services = worker, health, services
        self.stall_s, self.period_s = stall_s, period_s

    def healthy(self) -> bool:
        loop = self.worker.loop
        return loop.alive and not loop.stalled(self.stall_s)

    def run(self) -> None:
        while True:
            time.sleep(self.period_s)
            grpc_util.set_health(self.health, self.services, self.healthy())
            self.worker.reap()


def main(argv=None) -> int:
    from baton.membership import run_worker
    args = parse_args("decode", argv, __doc__)
    set_up_process(args)
    return run_worker(args, build(args))
