"""A baton worker (prefill or decode) as a Ray actor: it serves its gRPC service on a free
port and registers with the router itself, so an actor that Ray restarts re-registers."""
from __future__ import annotations

import argparse
import os


class WorkerActor:
    def __init__(self, role: str, argv: list[str]):
        from baton.worker_main import Worker, parse_args
        self.args: argparse.Namespace = parse_args(role, argv)
        self.worker = Worker(role, self.args)
        self.worker.register()
        self.worker.keep_registered()

    def info(self) -> dict:
        return {"role": self.worker.role, "worker_id": self.worker.worker_id, "pid": os.getpid(),
                "address": self.worker.address}

    def stop(self, grace: float = 3.0, deregister: bool = True) -> bool:
        """Deregister and stop serving (Ray's kill skips shutdown hooks, so do it first)."""
        self.worker.stop(grace, deregister)
        return True
