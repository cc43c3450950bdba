"""A baton worker (prefill, decode or colocated) as a Ray actor: it serves its gRPC service on a
free port and registers with the router itself, so an actor that Ray restarts re-registers."""
from __future__ import annotations

import os


class WorkerActor:
    def __init__(self, role: str, argv: list[str]):
        from baton.worker_process import parse_args, set_up_process
        from baton.membership import Membership
        if role == "prefill":
            from prefill_service.main import build
        else:
            from decode_service.main import build
        self.args = parse_args(role, argv)
        set_up_process(self.args)
        self.served = build(self.args)
        self.membership = Membership(self.args, self.served)
        self.membership.join()

    def info(self) -> dict:
        return {"role": self.served.role, "worker_id": self.args.worker_id, "pid": os.getpid(),
                "address": self.membership.info.address}

    def stop(self, grace: float = 3.0, deregister: bool = True) -> bool:
        """Deregister and stop serving (Ray's kill skips shutdown hooks, so do it first)."""
        if deregister:
            self.membership.leave()
        else:
            self.membership.stopping.set()
        self.served.stop(grace)
        return True
