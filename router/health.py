"""Router health: SERVING only once a real generation has gone through live workers, and
only while at least one prefill and one decode worker answer their health checks."""
from __future__ import annotations

import logging
import threading
import uuid

import grpc

from baton import grpc_util
from baton.v1 import router_pb2

log = logging.getLogger(__name__)


class RouterHealth(threading.Thread):
    def __init__(self, servicer, health, service: str, period_s: float = 1.0):
        super().__init__(name="router-health", daemon=True)
        self.servicer, self.health, self.service, self.period_s = servicer, health, service, period_s
        self.stopped = threading.Event()
        self.warm = False
        self.serving = False

    def _warm_up(self) -> bool:
        """One real generation through the workers (a 1-token query)."""
        ctx = _LocalContext()
        req = router_pb2.GenerateRequest(request_id=f"warmup-{uuid.uuid4().hex[:12]}", prompt_token_ids=[1, 2, 3],
                                         max_new_tokens=1)
        try:
            # drained, it settles as completed; uncounted: the warm-up is in no book, no metric
            return any([r.finish_reason for r in self.servicer.generate(req, ctx, counted=False)])
        except Exception as e:
            log.info("warm-up generation failed: %s", e)
            return False
        finally:
            ctx.end()

    def check(self) -> None:
        reg = self.servicer.registry
        reg.poll_health()
        ok = bool(reg.live("prefill")) and bool(reg.live("decode"))
        if ok and not self.warm:
            self.warm = ok = self._warm_up()
        if ok != self.serving:
            log.log(logging.INFO if ok else logging.WARNING, "router health: %s", "SERVING" if ok else "NOT_SERVING")
        self.serving = ok
        grpc_util.set_health(self.health, [self.service], ok)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.check()
            except Exception:
                log.exception("health check failed")
            self.stopped.wait(self.period_s)


class _LocalContext:
    """Enough of a ServicerContext to call Generate in-process."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, fn):
        self.callbacks.append(fn)
        return True

    def end(self):
        for fn in self.callbacks:
            fn()

    def is_active(self):
        return True

    def abort(self, code: grpc.StatusCode, details: str):
        raise RuntimeError(f"{code.name}: {details}")
