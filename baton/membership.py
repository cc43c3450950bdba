"""A worker's membership of the router's registry, from the worker's side: register once it
serves, register again every period (a restarted router learns of it within seconds), deregister
when it stops. Used by the worker processes (`python -m prefill_service`) and the Ray actors. The
worker side owns its client of the router's two membership calls: workers import nothing of router/."""
from __future__ import annotations

import argparse
import os
import socket
import threading

from baton import grpc_util
from baton.signals import announce_ready, stop_event
from baton.v1 import router_pb2, router_pb2_grpc
from baton.worker_process import Served


class Membership:
    def __init__(self, args: argparse.Namespace, served: Served, period_s: float = 2.0):
        self.args, self.period_s = args, period_s
        self.info = router_pb2.WorkerInfo(role=served.role, worker_id=args.worker_id, pid=os.getpid(),
                                          node=socket.gethostname(), address=f"{args.host}:{served.port}")
        self.stopping = threading.Event()

    def _call(self, method: str, request, timeout: float) -> None:
        """One Router membership call on a channel of its own (a restarted router is reached anew)."""
        with grpc_util.make_channel(self.args.router, tls_root_cert=self.args.tls_root_cert) as channel:
            getattr(router_pb2_grpc.RouterStub(channel), method)(
                request, timeout=timeout, metadata=grpc_util.auth_metadata(self.args.auth_token))

    def _register(self) -> None:
        self._call("RegisterWorker", router_pb2.RegisterWorkerRequest(worker=self.info), timeout=10)

    def join(self) -> None:
        """Register now (a router that cannot be reached fails the start), then keep registering."""
        if not self.args.router:
            return
        self._register()

        def beat():
            while not self.stopping.wait(self.period_s):
                try:
                    self._register()
                except Exception:
                    pass  # the router is down or restarting; try again next period
        threading.Thread(target=beat, name="register-heartbeat", daemon=True).start()

    def leave(self) -> None:
        self.stopping.set()
        if self.args.router:
            try:
                self._call("DeregisterWorker", router_pb2.DeregisterWorkerRequest(worker_id=self.args.worker_id),
                           timeout=2)
            except Exception:
                pass  # the router may be gone already


def run_worker(args: argparse.Namespace, served: Served, grace_s: float = 3.0) -> int:
    """Join the router, say BATON_READY, serve until SIGTERM/SIGINT, then leave and stop."""
    done = stop_event()
    membership = Membership(args, served)
    membership.join()
    announce_ready(served.role, membership.info.address)
    done.wait()
    membership.leave()
    served.stop(grace_s)
    return 0
