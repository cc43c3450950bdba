"""Run one prefill or decode worker as its own process (no Ray needed):

    python -m prefill_service --port 0 --model DIR [--router 127.0.0.1:50051]
    python -m decode_service  --port 0 --model DIR [--router 127.0.0.1:50051] [--colocated]

Prints `BATON_READY role=<role> address=<host:port> pid=<pid>` once it serves, registers
with the router when one is given, and stops cleanly on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid

from baton.model_loader import DTYPES


def parse_args(role: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"{role}_service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--router", default=None, help="router host:port to register with")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"))
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-root-cert", default=None, help="CA to verify peers' TLS certificates")
    p.add_argument("--tls-mutual", action="store_true",
                   help="demand a client certificate signed by --tls-root-cert from every caller (mutual TLS)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPU ids to pin this worker to (default: any); e.g. to give prefill and "
                        "decode workers their own cores on one machine")
    p.add_argument("--lease-s", type=float, default=30.0, help="how long unclaimed K/V is kept")
    p.add_argument("--log-level", default="INFO")
    if role == "decode":
        p.add_argument("--colocated", action="store_true",
                       help="also serve the Prefill role: prompts sent to this worker are prefilled in its own "
                            "decode steps and their K/V handed to its batch in memory (one device, one process)")
    return p.parse_args(argv)


class Worker:
    """One worker process: its model, its gRPC server, its registration."""

    def __init__(self, role: str, args: argparse.Namespace):
        import torch
        from baton.config import EngineConfig
        from baton.model_loader import load_model
        if args.cpus:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        if args.threads:
            torch.set_num_threads(args.threads)
        self.role, self.args = role, args
        self.worker_id = args.worker_id or f"{role}-{uuid.uuid4().hex[:8]}"
        cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                           max_batch=args.max_batch, max_queue=args.max_queue)
        tls = dict(auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                   tls_client_ca=args.tls_root_cert if args.tls_mutual else None)
        self.loop = None
        if role in ("decode", "colocated"):
            from baton.engine import Engine
            from baton.engine_loop import EngineLoop
            from baton.request import Request
            from baton.sampling import SamplingParams
            from decode_service.server import serve
            # The loop thread loads the model and runs it: one thread for all model work (device_thread.py).
            self.loop = EngineLoop(lambda: Engine(load_model(args.model, args.dtype, args.device), cfg)).start()
            list(self.loop.submit(Request("warmup", [1, 2, 3], SamplingParams(max_new_tokens=2))))
            self.server, self.port, self.watchdog = serve(self.loop, args.host, args.port, lease_s=args.lease_s,
                                                          colocated=role == "colocated",
                                                          tls_root_cert=args.tls_root_cert, **tls)
        else:
            from baton.device_thread import DeviceThread
            from baton.engine import Prefiller
            from baton.model_runner import ModelRunner
            from prefill_service.server import serve
            self.device = DeviceThread()
            model = self.device.run(load_model, args.model, args.dtype, args.device)
            prefiller = self.device.run(lambda: Prefiller(ModelRunner(model.model)))
            self.server, self.port = serve(prefiller, model.max_len, args.host, args.port, device=self.device,
                                           tls_root_cert=args.tls_root_cert, **tls)
        self.address = f"{args.host}:{self.port}"

    def info(self):
        from baton.v1 import router_pb2
        return router_pb2.WorkerInfo(role=self.role, worker_id=self.worker_id, pid=os.getpid(),
                                     node=socket.gethostname(), address=self.address)

    def register(self) -> None:
        if self.args.router:
            from router.client import RouterClient
            with RouterClient(self.args.router, auth_token=self.args.auth_token,
                              tls_root_cert=self.args.tls_root_cert) as c:
                c.register_worker(self.info())

    def keep_registered(self, period_s: float = 2.0) -> None:
        """Register again every period: a restarted router learns about this worker within seconds."""
        def beat():
            while not self.stopping.wait(period_s):
                try:
                    self.register()
                except Exception:
                    pass  # the router is down or restarting; try again next period
        self.stopping = threading.Event()
        threading.Thread(target=beat, name="register-heartbeat", daemon=True).start()

    def deregister(self) -> None:
        if self.args.router:
            try:
                from router.client import RouterClient
                with RouterClient(self.args.router, auth_token=self.args.auth_token,
                                  tls_root_cert=self.args.tls_root_cert) as c:
                    c.deregister_worker(self.worker_id, timeout=2)
            except Exception:
                pass  # the router may be gone already

    def stop(self, grace: float = 3.0, deregister: bool = True) -> None:
        if hasattr(self, "stopping"):
            self.stopping.set()
        if deregister:
            self.deregister()
        self.server.stop(grace).wait(grace + 1)
        if self.loop is not None:
            self.loop.stop()


def main(role: str, argv=None) -> int:
    args = parse_args(role, argv)
    if getattr(args, "colocated", False):
        role = "colocated"
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")
    worker = Worker(role, args)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    worker.register()
    worker.keep_registered()
    print(f"BATON_READY role={role} address={worker.address} pid={os.getpid()}", flush=True)
    done.wait()
    worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
