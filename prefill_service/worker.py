"""The prefill worker: its gRPC face (PrefillServicer: convert, delegate, convert back) and its
logic (PrefillWorker, independent of the transport): compute, then push to a decode worker.

The K/V lives here only between its computation and the end of its transfer, which has a
deadline; an abort before or during either drops it.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from baton import faults, grammar, grpc_util
from baton.engine.prefill import PrefillOutput, Prefiller
from baton.errors import DecodeUnreachable, InvalidArgument, NotFound
from baton.request import Request, Status
from baton.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from baton.wire import params_from_pb
from prefill_service.kv_push import KVPusher

SERVICE = "baton.v1.Prefill"

# send(decode_address, request, prefill_output, deadline_s) -> seconds the transfer took
KVSender = Callable[[str, Request, PrefillOutput, float], float]
# compute(requests) -> their prefills, on the process's one model thread (baton/device_thread.py)
Compute = Callable[[list[Request]], list[PrefillOutput]]


@dataclass(frozen=True)
class PrefillResult:
    num_tokens: int
    kv_bytes: int
    compute_s: float
    transfer_s: float


class PrefillWorker:
    def __init__(self, prefiller: Prefiller, max_len: int, send: KVSender, transfer_timeout_s: float = 30.0,
                 token_budget: int = 4096, compute: Compute | None = None):
        self.prefiller, self.max_len, self.send = prefiller, max_len, send
        self.compute = compute or prefiller.prefill_many
        self.transfer_timeout_s = transfer_timeout_s
        self.token_budget = token_budget       # prompt tokens prefilled together in one pass
        self.pending: list[tuple[Request, Future]] = []
        self.cond = threading.Condition()
        self.computing = False
        self.aborted: dict[str, tuple[float, float]] = {}   # request id -> (when, attempts refused up to)
        self.active: Counter[str] = Counter()   # request id -> prefills of it in progress (a migrated
                                                # request may be prefilled again while its first push hangs)
        self.stats = {"prefills": 0, "tokens": 0, "kv_bytes": 0, "transfer_s": 0.0, "compute_s": 0.0}

    @property
    def load(self) -> int:
        return sum(self.active.values())

    @property
    def transport(self):
        """The sender's K/V transport (baton/kv_transport/), if it has one."""
        return getattr(self.send, "transport", None)

    def prefix_stats(self) -> dict:
        """Its prefix cache's counters (plain ints, read as the model thread leaves them)."""
        return self.prefiller.prefixes.stats()

    def check(self, req: Request) -> None:
        """Refuse what no worker could prefill: bad sampling parameters, no tokens, too many, ids
        outside the vocabulary."""
        grammar.check_request(req.params, self.prefiller.runner.vocab_size, self.prefiller.grammars)
        ids = req.all_ids
        if not ids:
            raise InvalidArgument("prompt_token_ids must not be empty", field="prompt")
        if len(ids) >= self.max_len:
            raise InvalidArgument(f"{len(ids)} tokens do not fit the model context of {self.max_len}", field="prompt")
        if any(t < 0 or t >= self.prefiller.runner.vocab_size for t in ids):
            raise InvalidArgument(f"token ids must be in [0, {self.prefiller.runner.vocab_size})", field="prompt")

    def prefill(self, req: Request, decode_address: str, attempt: int = 0) -> PrefillResult:
        """Prefill and push one request; `attempt` (the router's count, see prefill.proto) lets a
        retry or a migration through an Abort of an earlier attempt."""
        self.check(req)
        ids = req.all_ids
        with self.cond:
            self.active[req.request_id] += 1
        try:
            self._check_alive(req.request_id, attempt)
            req.status = Status.PREFILLING
            pre, compute_s = self._compute(req)
            self._check_alive(req.request_id, attempt)
            req.status = Status.TRANSFERRING
            transfer_s = self.send(decode_address, req, pre, self.transfer_timeout_s)
        finally:
            with self.cond:
                self.active[req.request_id] -= 1
                if not self.active[req.request_id]:
                    del self.active[req.request_id]
        kv_bytes = pre.kv.numel() * pre.kv.element_size()
        for k, v in (("prefills", 1), ("tokens", len(ids)), ("kv_bytes", kv_bytes),
                     ("transfer_s", transfer_s), ("compute_s", compute_s)):
            self.stats[k] += v
        return PrefillResult(len(ids), kv_bytes, compute_s, transfer_s)

    def _compute(self, req: Request) -> tuple[PrefillOutput, float]:
        """Queue the request; whichever caller finds the device free prefills everything queued
        (up to the token budget) in one pass. Concurrent requests thus share a read of the weights."""
        fut: Future = Future()
        with self.cond:
            self.pending.append((req, fut))
        while True:
            with self.cond:
                while not fut.done() and self.computing:
                    self.cond.wait()
                if fut.done():
                    return fut.result()
                self.computing = True
                group, budget = [], self.token_budget
                while self.pending and (not group or len(self.pending[0][0].all_ids) <= budget):
                    budget -= len(self.pending[0][0].all_ids)
                    group.append(self.pending.pop(0))
            try:
                t = time.monotonic()
                outs = self.compute([r for r, _ in group])
                took = time.monotonic() - t
                for (_, f), pre in zip(group, outs):
                    f.set_result((pre, took))
            except BaseException as e:
                for _, f in group:
                    if not f.done():
                        f.set_exception(e)
            finally:
                with self.cond:
                    self.computing = False
                    self.cond.notify_all()

    def abort(self, request_id: str, attempt: int = 0) -> bool:
        """Stop the request's prefill and push and refuse it from now on, or only its attempts up
        to `attempt` when that is > 0; True if it was here."""
        now = time.monotonic()
        with self.cond:
            found = request_id in self.active
            self.aborted[request_id] = (now, attempt or float("inf"))
            for rid in [r for r, (t, _) in self.aborted.items() if now - t > 300]:
                del self.aborted[rid]
        # An attempt's own push stopped when the router cancelled its Prefill call (PrefillServicer);
        # any push left may be a later attempt's, which this abort must not touch.
        if not attempt:
            self.cancel_transfer(request_id)
        return found

    def cancel_transfer(self, request_id: str, address: str | None = None) -> None:
        """Stop pushing the request's K/V (to `address`, or anywhere), if the sender can."""
        cancel = getattr(self.send, "cancel", None)
        if cancel is not None:
            cancel(request_id, address)

    def _check_alive(self, request_id: str, attempt: int) -> None:
        refused = self.aborted.get(request_id)
        if refused is not None and attempt <= refused[1]:
            raise NotFound(f"request {request_id!r} was aborted")


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker

    @grpc_util.rpc
    def Prefill(self, request, context):
        faults.injector().check_call("prefill_fail")
        if not request.decode_address:
            raise InvalidArgument("decode_address must name the decode worker (host:port)")
        params = params_from_pb(request.params)
        req = Request(request.request_id, list(request.prompt_token_ids), params,
                      output_ids=list(request.generated_token_ids), attempt=request.attempt)
        # The router cancels this call when its client goes away or a worker is marked dead: the
        # push stops then, not at its own deadline (add_callback runs when the call ends, however).
        answered = threading.Event()
        context.add_callback(lambda: answered.is_set() or self.worker.cancel_transfer(req.request_id,
                                                                                      request.decode_address))
        try:
            r = self.worker.prefill(req, request.decode_address, request.attempt)
        except grpc.RpcError as e:  # the decode side refused or failed: say which side
            code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNAVAILABLE
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise DecodeUnreachable(f"decode worker {request.decode_address} unreachable: {code.name}") from None
            raise
        finally:
            answered.set()
        return prefill_pb2.PrefillResponse(num_tokens=r.num_tokens, kv_bytes=r.kv_bytes,
                                           compute_s=r.compute_s, transfer_s=r.transfer_s)

    @grpc_util.rpc
    def Abort(self, request, context):
        return common_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.attempt))

    @grpc_util.rpc
    def Stats(self, request, context):
        s = self.worker.stats
        return common_pb2.WorkerStatsResponse(running=self.worker.load, kv_transfers=s["prefills"],
                                               kv_bytes=s["kv_bytes"], kv_transfer_s=s["transfer_s"],
                                               completed=s["prefills"], pid=os.getpid(),
                                               faults_fired=faults.injector().counts(),
                                               **_prefix_stats(self.worker.prefix_stats()),
                                               **transport_stats(self.worker.transport))


def prefill_worker(prefiller: Prefiller, max_len: int, *, auth_token=None, tls_cert=None, tls_key=None,
                   tls_root_cert=None, transfer_timeout_s: float = 30.0, compute=None,
                   transport=None) -> PrefillWorker:
    """A PrefillWorker that pushes K/V to decode workers through `transport` (baton/kv_transport/;
    default grpc), its control over gRPC. It presents its own certificate to decode workers, which
    matters when they demand one (mutual TLS). `compute` runs the model on the process's model
    thread (default: the calling thread)."""
    pusher = KVPusher(auth_token, tls_root_cert, tls_cert, tls_key, transport=transport)
    return PrefillWorker(prefiller, max_len, pusher, transfer_timeout_s, compute=compute)


def add_servicer(worker, server) -> None:
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(worker), server)


def transport_stats(*transports) -> dict:
    """A worker's Stats fields of its K/V transport(s): the name and the bytes held for transfers."""
    named = [t for t in transports if t is not None]
    return {"kv_transport": named[0].name if named else "grpc",
            "kv_transport_held_bytes": sum(t.held_bytes() for t in named)}


def _prefix_stats(s: dict) -> dict:
    return {k: s.get(k, 0) for k in ("prefix_cache_queried_tokens", "prefix_cache_hit_tokens")}
