"""A worker's membership of the router's registry, from the worker's side: register once it
serves, register again every period (a restarted router learns of it within seconds), deregister
when it stops. Used by the worker processes (`python -m prefill_service`) and the Ray actors."""
from __future__ import annotations

import argparse
import os
import socket
import threading

from baton.signals import announce_ready, stop_event
from baton.v1 import router_pb2
from baton.worker_process import Served
from router.client import RouterClient


class Membership:
    def __init__(self, args: argparse.Namespace, served: Served, period_s: float = 2.0):
        self.args, self.period_s = args, period_s
        self.info = router_pb2.WorkerInfo(role=served.role, worker_id=args.worker_id, pid=os.getpid(),
                                          node=socket.gethostname(), address=f"{args.host}:{served.port}")
        self.stopping = threading.Event()

    def _client(self) -> RouterClient:
        return RouterClient(self.args.router, auth_token=self.args.auth_token, tls_root_cert=self.args.tls_root_cert)

    def join(self) -> None:
        """Register now (a router that cannot be reached fails the start), then keep registering."""
        if not self.args.router:
            return
        with self._client() as c:
            c.register_worker(self.info)

        def beat():
            while not self.stopping.wait(self.period_s):
                try:
                    with self._client() as c:
                        c.register_worker(self.info)
                except Exception:
                    pass  # the router is down or restarting; try again next period
        threading.Thread(target=beat, name="register-heartbeat", daemon=True).start()

    def leave(self) -> None:
        self.stopping.set()
        if self.args.router:
            try:
                with self._client() as c:
                    c.deregister_worker(self.args.worker_id, timeout=2)
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
