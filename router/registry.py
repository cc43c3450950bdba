"""The router's view of the workers: who they are, whether they are alive, their load."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton import grpc_util
from baton.errors import Unavailable
from baton.v1 import decode_pb2_grpc, prefill_pb2_grpc, router_pb2

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "colocated")   # a colocated worker serves both other roles
# Health checks a worker may miss by timing out before it is taken for dead: one slow answer from
# a busy worker must not fail every request it holds. Refused or unreachable counts at once.
HEALTH_MISSES = 2
# What a call on a replaced handle raises. register() closes the channel of the handle a restarted worker's
# registration replaces, while a request or a poll may still hold that handle; for a call on a closed
# channel gRPC raises ValueError ("Cannot invoke RPC on closed channel!"), not an RpcError.
ChannelClosed = ValueError


@dataclass(eq=False)
class WorkerHandle:
    role: str
    worker_id: str
    pid: int
    node: str
    address: str
    channel: grpc.Channel
    stub: object
    health: health_pb2_grpc.HealthStub
    alive: bool = True
    draining: bool = False
    load: int = 0                     # dispatched and not yet finished, counted at dispatch time
    health_misses: int = 0            # health checks timed out in a row
    # The health check itself (not one failed call) found it down: refused, NOT_SERVING or silent
    # HEALTH_MISSES times. Work in flight on it is moved at once; a worker only a call failed is
    # avoided for new picks until its next check, but what it is doing is left to finish or fail.
    health_down: bool = False
    stats: dict = field(default_factory=dict)

    def to_pb(self) -> router_pb2.WorkerInfo:
        s = self.stats
        return router_pb2.WorkerInfo(
            role=self.role, worker_id=self.worker_id, pid=self.pid, node=self.node, address=self.address,
            alive=self.alive, load=self.load, draining=self.draining,
            kv_transport=s.get("kv_transport", ""),
            **{k: s.get(k, 0) for k in STAT_KEYS if k in router_pb2.WorkerInfo.DESCRIPTOR.fields_by_name})


class Registry:
    def __init__(self, tls_root_cert: str | None = None, tls_client_cert: str | None = None,
                 tls_client_key: str | None = None):
        # The router presents its own certificate to workers: they may demand one (mutual TLS).
        self.tls = dict(tls_root_cert=tls_root_cert, tls_client_cert=tls_client_cert, tls_client_key=tls_client_key)
        self.workers: dict[str, WorkerHandle] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def register(self, info: router_pb2.WorkerInfo) -> WorkerHandle:
        if info.role not in ROLES:
            from baton.errors import InvalidArgument
            raise InvalidArgument(f"role must be one of {ROLES}, got {info.role!r}")
        with self.lock:
            known = self.workers.get(info.worker_id)
            if known is not None and known.address == info.address and known.pid == info.pid:
                known.draining = False  # a heartbeat: keep its channel and load count
                return known
        channel = grpc_util.make_channel(info.address, keepalive=True, **self.tls)
        w = WorkerHandle(info.role, info.worker_id, info.pid, info.node, info.address, channel,
                         _stub(info.role, channel), health_pb2_grpc.HealthStub(channel))
        with self.lock:
            old = self.workers.pop(info.worker_id, None)
            self.workers[info.worker_id] = w
            self.changed.notify_all()
        if old is not None:
            old.alive, old.health_down = False, True   # what still runs on the old handle moves on
            old.channel.close()
        log.info("registered %s worker %s at %s (pid %d)", w.role, w.worker_id, w.address, w.pid)
        return w

    def deregister(self, worker_id: str) -> None:
        with self.lock:
            w = self.workers.pop(worker_id, None)
            self.changed.notify_all()
        if w is not None:
            log.info("deregistered %s worker %s", w.role, worker_id)

    def live(self, role: str) -> list[WorkerHandle]:
        """Live workers that serve a role (colocated workers serve both)."""
        with self.lock:
            return [w for w in self.workers.values() if _serves(w, role) and w.alive and not w.draining]

    def topology(self) -> str:
        """colocated, disaggregated, mixed, or none (no worker registered)."""
        with self.lock:
            kinds = {"colocated" if w.role == "colocated" else "disaggregated" for w in self.workers.values()}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")

    def pick(self, role: str, avoid: set[str] = frozenset(), prefer: WorkerHandle | None = None) -> WorkerHandle:
        """The least-loaded live worker that serves a role, or `prefer` when it can (a colocated
        worker prefills for its own batch, in memory). Its load is counted now (call release()).
        Workers in `avoid` (they failed this request) only when no other is live: a transient fault on
        each of two decode workers in turn need not fail a request (the attempts a worker failed are
        aborted there, not the request: decode_service/worker.py)."""
        with self.lock:
            live = [w for w in self.workers.values() if _serves(w, role) and w.alive and not w.draining]
            cands = [w for w in live if w.worker_id not in avoid] or live
            if not cands:
                raise Unavailable(f"no live {role} worker")
            w = prefer if prefer in cands else min(cands, key=lambda w: w.load)
            w.load += 1
            return w

    def release(self, w: WorkerHandle) -> None:
        with self.lock:
            w.load = max(0, w.load - 1)

    def mark_dead(self, w: WorkerHandle, why: str) -> None:
        """Take a worker out of new picks until the next health check says it serves (poll_health)."""
        if w.alive:
            log.warning("%s worker %s (%s) marked dead: %s", w.role, w.worker_id, w.address, why)
        w.alive = False

    def poll_health(self, timeout_s: float = 1.0) -> None:
        """Ask every worker's grpc.health.v1; alive == SERVING. A worker that comes back is used
        again. A check that times out counts as a miss; HEALTH_MISSES in a row, any other failure
        or NOT_SERVING mark the worker dead."""
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            try:
                resp = w.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
                ok, why = resp.status == health_pb2.HealthCheckResponse.SERVING, "NOT_SERVING"
                w.health_misses = 0
            except grpc.RpcError as e:
                ok, why = False, e.code().name
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    w.health_misses += 1
                    if w.health_misses < HEALTH_MISSES:
                        log.info("%s worker %s missed a health check (%d in a row)", w.role, w.worker_id,
                                 w.health_misses)
                        continue
            except ChannelClosed:   # replaced while this poll ran: the new handle is polled next time
                continue
            if ok and not w.alive:
                log.info("%s worker %s is serving again", w.role, w.worker_id)
            if not ok:
                self.mark_dead(w, why)
            w.alive, w.health_down = ok, not ok


# What the router keeps of a worker's WorkerStatsResponse (WorkerHandle.stats), the one list of them.
STAT_KEYS = ("running", "waiting", "batch_width", "kv_cache_bytes", "kv_used_bytes", "max_batch",
             "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "max_len")


def worker_stats(reply) -> dict:
    """The STAT_KEYS of a WorkerStatsResponse or WorkerInfo (0 where a message has no such field)."""
    return {**{k: getattr(reply, k, 0) for k in STAT_KEYS}, "kv_transport": getattr(reply, "kv_transport", "")}


def max_batch(workers) -> int:
    """The largest decode batch (rows) among the workers that decode, as their Stats last reported it."""
    return max((w.stats.get("max_batch", 0) for w in workers if _serves(w, "decode")), default=0)


def decode_context(decoders, model_context: int) -> int:
    """The longest request (prompt + output tokens) every one of the live decode-side workers
    (Registry.live("decode")) can hold: its K/V budget may cap it below the model's context
    (baton/engine/cache.py); `model_context` if none says."""
    return min([model_context] + [w.stats["max_len"] for w in decoders if w.stats.get("max_len")])


def _serves(w: WorkerHandle, role: str) -> bool:
    return w.role == role or w.role == "colocated"


def _stub(role: str, channel: grpc.Channel):
    """The worker's service stub; a colocated worker's answers both the Decode and the Prefill calls."""
    if role == "prefill":
        return prefill_pb2_grpc.PrefillStub(channel)
    decode = decode_pb2_grpc.DecodeStub(channel)
    if role == "colocated":
        decode.Prefill = prefill_pb2_grpc.PrefillStub(channel).Prefill
    return decode
