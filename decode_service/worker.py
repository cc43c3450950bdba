"""The decode worker: its gRPC face (DecodeServicer: convert, delegate, convert back) and its
bookkeeping (DecodeWorker, independent of the transport).

A query reaches a decode worker from two sides that race: its K/V (pushed by a prefill
worker) and the router's `attach` that streams its tokens back. Whichever comes first
waits for the other, each for a bounded lease; an abort may come at any point and wins.
Rules (one place frees a slot):
- K/V that nobody attaches to within `lease_s` is aborted: its row or queue slot is freed.
- An attach that no K/V reaches within its timeout ends with DEADLINE_EXCEEDED (the service asks
  `try_attach` in short waits, sending keep-alives between); the router then aborts it everywhere.
- An abort before the K/V arrives leaves a tombstone, so the late K/V is refused, not run. An abort
  of a request's attempts up to n (it migrated away) refuses only those: a later attempt that comes
  back here (its other workers failed too) is served.

A colocated worker (one process serving Decode and Prefill on one device) adds the Prefill role:
decode_service/colocated.py.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from baton import faults, grammar, grpc_util
from baton.engine.cache import token_bytes
from baton.engine.loop import EngineLoop, StreamClosed, TokenStream
from baton.engine.prefill import PrefillOutput
from baton.engine.scheduler import QueueFull
from baton.errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                          ResourceExhausted, Unavailable)
from baton.kv_transport.base import Receiver, dtype_of, header_transport
from baton.kv_transport.grpc import GrpcReceiver
from baton.request import Request
from baton.sampling import SamplingParams
from baton.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from baton.wire import events_to_pb, logprobs_from_pb, params_from_pb
from prefill_service.worker import transport_stats

SERVICE = "baton.v1.Decode"
STALL_S = 15.0   # an engine loop that has not gone round for this long, with work to do, is stalled
KEEPALIVE = decode_pb2.TokenChunk(keepalive=True)
# Token messages: a worker sends about this many a second over all its requests' Attach streams, however
# many it serves; a request's stream waits its share (attached streams / this, at most MAX_PACE_S) after
# a message, and its next one carries every token made meanwhile. One request alone gets each token at
# once; 256 get a message every 0.25 s with a few tokens in it. Each message costs the worker, the router
# and the gateway a fixed CPU price whatever it holds, so the path's cost per token falls as load rises.
STREAM_MSGS_PER_S = 1000.0
MAX_PACE_S = 0.25


@dataclass
class _Slot:
    stream: TokenStream
    created_s: float
    attempt: int = 0            # the router's prefill attempt its K/V or prompt came from
    attached: bool = False


@dataclass
class _Tombstone:
    at_s: float
    up_to: float                # attempts refused: those <= up_to (inf: every one, the request is over)

    def refuses(self, attempt: int) -> bool:
        return attempt <= self.up_to


class DecodeWorker:
    def __init__(self, loop: EngineLoop, lease_s: float = 30.0, tombstone_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, stream_msgs_per_s: float = STREAM_MSGS_PER_S):
        self.loop, self.clock = loop, clock     # clock: leases and tombstones age by it (tests pass a fake)
        self.lease_s, self.tombstone_s = lease_s, tombstone_s
        self.slots: dict[str, _Slot] = {}
        self.tombstones: dict[str, _Tombstone] = {}   # request_id -> when it was aborted, up to which attempt
        self.listening = 0                         # slots with a listener (attached), for pace_s
        self.stream_msgs_per_s = stream_msgs_per_s
        self.cond = threading.Condition()
        self.transfers = {"count": 0, "bytes": 0, "seconds": 0.0}
        self.transports: list = []   # its K/V transports' receiving (and, colocated, sending) sides, for Stats
        self.follows: set = set()    # the routers' Follow streams being served (decode_service/follow.py)
        self.ending = threading.Event()   # stopping: a Follow stream ends once nothing is on it
        info = loop.info    # the engine's fixed facts: its state is the loop thread's alone
        self.kv_shape, self.dtype, self.vocab_size = info.kv_shape, info.dtype, info.vocab_size
        self.max_len, self.grammars = info.max_len, info.grammars

    # ---- K/V side --------------------------------------------------------------------------
    def check_header(self, request_id: str, dtype: torch.dtype, shape: tuple[int, ...],
                     num_tokens: int, params: SamplingParams, attempt: int = 0) -> None:
        """Refuse a transfer before any bytes are read: wrong model shape, dtype, or a dead id."""
        L, two, H, D = self.kv_shape
        if not request_id:
            raise InvalidArgument("request_id must not be empty")
        if dtype != self.dtype:
            raise InvalidArgument(f"K/V dtype {dtype} does not match this worker's model dtype {self.dtype}")
        if len(shape) != 5 or shape[:3] != (L, two, H) or shape[4] != D or shape[3] < 1:
            raise InvalidArgument(f"K/V shape {tuple(shape)} does not match (layers={L}, 2, kv_heads={H}, P>=1, head_dim={D})")
        if shape[3] != num_tokens:
            raise InvalidArgument(f"K/V holds {shape[3]} tokens but the request has {num_tokens}")
        if num_tokens >= self.max_len:
            raise InvalidArgument(f"{num_tokens} tokens do not fit the model context of {self.max_len}", field="prompt")
        grammar.check_request(params, self.vocab_size, self.grammars)
        with self.cond:
            self._check_alive(request_id, attempt)
            if request_id in self.slots:
                raise AlreadyExists(f"request {request_id!r} is already on this worker")

    def _check_alive(self, request_id: str, attempt: int) -> None:
        """NotFound when an abort refuses this attempt of the request (under self.cond)."""
        tomb = self.tombstones.get(request_id)
        if tomb is not None and tomb.refuses(attempt):
            raise NotFound(f"request {request_id!r} was aborted")

    def admit(self, req: Request, pre: PrefillOutput, transfer_s: float = 0.0) -> None:
        """A complete, validated transfer: the request joins the batch's queue."""
        self._admit(req, lambda: self.loop.submit_prefilled(req, pre))
        with self.cond:
            self.transfers["count"] += 1
            self.transfers["bytes"] += pre.kv.numel() * pre.kv.element_size()
            self.transfers["seconds"] += transfer_s

    def admit_prompt(self, req: Request) -> None:
        """A prompt to prefill in this worker's own steps (colocated): its K/V goes straight from
        the chunked prefill into the batch, in memory."""
        self._admit(req, lambda: self.loop.submit(req))

    def _admit(self, req: Request, submit) -> None:
        with self.cond:
            self._check_alive(req.request_id, req.attempt)
            if req.request_id in self.slots:
                raise AlreadyExists(f"request {req.request_id!r} is already on this worker")
            self.slots[req.request_id] = _Slot(submit(), self.clock(), req.attempt)   # QueueFull / duplicates raise here
            self.cond.notify_all()

    # ---- router side -------------------------------------------------------------------------
    def try_attach(self, request_id: str, wait_s: float, attempt: int = 0) -> TokenStream | None:
        """The request's token stream if its K/V arrives within wait_s, else None (ask again). A
        listener for `attempt` (and later) is refused when an abort refuses that attempt."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self.cond:
            while request_id not in self.slots:
                self._check_alive(request_id, attempt)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))
            slot = self.slots[request_id]
            if slot.attached:
                raise AlreadyExists(f"request {request_id!r} already has a listener")
            slot.attached = True
            self.listening += 1
            return slot.stream

    def pace_s(self) -> float:
        """How long a request's stream waits after a message before its next (see STREAM_MSGS_PER_S)."""
        return min(MAX_PACE_S, self.listening / self.stream_msgs_per_s) if self.stream_msgs_per_s > 0 else 0.0

    def _drop(self, request_id: str) -> bool:
        """Forget the request's slot (under self.cond); True if it was here."""
        slot = self.slots.pop(request_id, None)
        if slot is not None and slot.attached:
            self.listening -= 1
        return slot is not None

    def release(self, request_id: str) -> None:
        """The listener is done with the request (finished, or it went away: then abort)."""
        with self.cond:
            self._drop(request_id)
        self.loop.abort(request_id)  # a no-op for a finished request

    def abort(self, request_id: str, attempt: int = 0) -> bool:
        """Drop the request here, now or when its K/V arrives: every attempt, or (attempt > 0) those up
        to `attempt` only, so that a later one may still come here. True if it was here."""
        up_to = attempt or float("inf")
        with self.cond:
            old = self.tombstones.get(request_id)
            self.tombstones[request_id] = _Tombstone(self.clock(), max(up_to, old.up_to if old else 0))
            slot = self.slots.get(request_id)
            found = slot is not None and slot.attempt <= up_to and self._drop(request_id)
            self.cond.notify_all()
        if found or slot is None:   # a later attempt's row stays
            self.loop.abort(request_id)
        return found

    def end_follows(self) -> None:
        """The worker is stopping: each Follow stream ends as soon as it holds no request."""
        self.ending.set()
        for f in list(self.follows):
            f.wake.set()

    def reap(self) -> int:
        """Abort K/V nobody attached to within the lease; forget old tombstones. Returns aborts."""
        now = self.clock()
        with self.cond:
            stale = [rid for rid, s in self.slots.items() if not s.attached and now - s.created_s > self.lease_s]
            for rid in [r for r, t in self.tombstones.items() if now - t.at_s > self.tombstone_s]:
                del self.tombstones[rid]
        for rid in stale:
            self.abort(rid)
        return len(stale)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, attach_timeout_s: float = 30.0, stall_s: float = STALL_S,
                 receivers: dict[str, Receiver] | None = None):
        self.worker, self.loop = worker, worker.loop
        self.attach_timeout_s, self.stall_s = attach_timeout_s, stall_s
        L, _, H, D = worker.kv_shape
        self.max_kv_bytes = token_bytes(L, H, D, worker.dtype) * worker.max_len
        self.colocated = None   # decode_service/colocated.py's ColocatedPrefill where this worker serves Prefill too
        # the transports K/V may come by (baton/kv_transport/): grpc always, nixl where it was loaded
        self.receivers = receivers or {"grpc": GrpcReceiver(self.max_kv_bytes)}

    @grpc_util.rpc
    def TransferKV(self, request_iterator, context):
        """Control first (the header: checked before anything is read or allocated), then the bytes by
        the transport the header names, then the request joins the batch's queue."""
        t0 = time.monotonic()
        faults.injector().check_call("transfer_fail")
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("a K/V transfer must start with a header")
        h = first.header
        dtype, params = dtype_of(h.dtype), params_from_pb(h.params)
        num_tokens = len(h.prompt_token_ids) + len(h.generated_token_ids)
        self.worker.check_header(h.request_id, dtype, tuple(h.shape), num_tokens, params, h.attempt)
        vocab = self.worker.vocab_size
        if h.next_token >= vocab:
            raise InvalidArgument(f"next_token must be in [0, {vocab})")
        kind = header_transport(h)
        if kind not in self.receivers:
            raise FailedPrecondition(f"K/V sent with {kind}, but this worker takes {', '.join(self.receivers)} "
                                     f"(start every worker with the same --kv-transport)")
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.attach_timeout_s)
        kv = self.receivers[kind].receive(h, _data(request_iterator), dtype, tuple(h.shape), deadline, context.is_active)
        req = Request(h.request_id, list(h.prompt_token_ids), params, output_ids=list(h.generated_token_ids),
                      attempt=h.attempt)
        try:
            lp = logprobs_from_pb(h.next_token_logprobs) if h.HasField("next_token_logprobs") else None
            self.worker.admit(req, PrefillOutput(h.next_token, kv, lp), time.monotonic() - t0)
        except QueueFull as e:
            raise ResourceExhausted(str(e)) from None
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return decode_pb2.TransferKVResponse(queue_position=self.loop.stats.get("joining", 0))

    @grpc_util.rpc
    def Attach(self, request, context):
        faults.injector().check_call("attach_fail")
        rid, every = request.request_id, request.keepalive_s or None
        # The listener went away (cancel, deadline, router died): free the row now.
        context.add_callback(lambda: self.worker.release(rid))
        try:
            timeout_s = request.timeout_s or self.attach_timeout_s
            deadline = time.monotonic() + timeout_s
            while (stream := self.worker.try_attach(rid, min(every or timeout_s, deadline - time.monotonic()))) is None:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"no K/V for request {rid!r} within {timeout_s:.1f} s")
                yield from self._keepalive()
            next_at = 0.0   # the first token goes at once; then each message waits its pace
            while True:
                if (pause := next_at - time.monotonic()) > 0:
                    time.sleep(pause)   # a cancel meanwhile has freed the row already (the callback above)
                try:
                    events = stream.get_ready(timeout=every)
                except queue.Empty:
                    yield from self._keepalive()
                    continue
                yield events_to_pb(events)
                if events[-1].finish_reason is not None:
                    return
                next_at = time.monotonic() + self.worker.pace_s()
        except StreamClosed as e:
            # Closed without a last token: an abort while the engine runs, or the engine stopped.
            raise (Cancelled if self.loop.alive else Unavailable)(str(e)) from None
        finally:
            self.worker.release(rid)

    def _keepalive(self):
        """A keep-alive, only while the engine goes round: a hung engine falls silent."""
        if self.loop.beating(self.stall_s):
            yield KEEPALIVE

    @grpc_util.rpc
    def Follow(self, request_iterator, context):
        """Every request a router runs here, on one stream: one message per step (decode_service/follow.py)."""
        from decode_service.follow import Follow
        follow = Follow(self.worker, self.attach_timeout_s, self.stall_s, colocated=self.colocated)
        threading.Thread(target=follow.read, args=(request_iterator,), name="follow-read", daemon=True).start()
        yield from follow.messages(context)

    @grpc_util.rpc
    def Abort(self, request, context):
        return common_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.attempt))

    @grpc_util.rpc
    def Stats(self, request, context):
        return worker_stats(self.worker)


def _data(chunks) -> Iterator[bytes]:
    """The data chunks that follow a transfer's header."""
    for chunk in chunks:
        if chunk.WhichOneof("payload") != "data":
            raise InvalidArgument("only data chunks may follow the header")
        yield chunk.data


def worker_stats(worker: DecodeWorker) -> common_pb2.WorkerStatsResponse:
    s = worker.loop.stats
    if not s:   # the loop has not gone round yet
        return common_pb2.WorkerStatsResponse(pid=os.getpid(), max_batch=worker.loop.info.config.max_batch,
                                               max_len=worker.max_len, **transport_stats(*worker.transports))
    return common_pb2.WorkerStatsResponse(
        running=s["running"], waiting=s["waiting"], batch_width=s["batch_width"], kv_cache_bytes=s["kv_cache_bytes"],
        completed=s.get("completed", 0), cancelled=s.get("cancelled", 0), kv_transfers=worker.transfers["count"],
        kv_bytes=worker.transfers["bytes"], kv_transfer_s=worker.transfers["seconds"], pid=os.getpid(),
        attached=sum(1 for x in list(worker.slots.values()) if x.attached), kv_used_bytes=s["kv_used_bytes"],
        faults_fired=faults.injector().counts(), max_batch=worker.loop.info.config.max_batch,
        prefix_cache_queried_tokens=s["prefix_cache_queried_tokens"], prefix_cache_hit_tokens=s["prefix_cache_hit_tokens"],
        max_len=worker.max_len, **transport_stats(*worker.transports))
