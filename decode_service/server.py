"""The Decode gRPC service: K/V in (TransferKV), tokens out (Attach), Abort, Stats, health."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time

from baton import faults, grpc_util
from baton.engine import PrefillOutput
from baton.engine_loop import EngineLoop, StreamClosed
from baton.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from baton.kv_codec import DTYPES, KVAssembler
from baton.request import Request
from baton.scheduler import QueueFull
from baton.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2
from baton.wire import event_to_pb, logprobs_from_pb, params_from_pb
from decode_service.worker import DecodeWorker

log = logging.getLogger(__name__)
SERVICE = "baton.v1.Decode"
STALL_S = 15.0   # an engine loop that has not gone round for this long, with work to do, is stalled
KEEPALIVE = decode_pb2.TokenEvent(keepalive=True)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, attach_timeout_s: float = 30.0, stall_s: float = STALL_S):
        self.worker, self.loop = worker, worker.loop
        self.attach_timeout_s, self.stall_s = attach_timeout_s, stall_s
        runner = self.loop.engine.runner
        self.max_kv_bytes = runner.num_layers * 2 * runner.num_kv_heads * runner.head_dim * \
            runner.dtype.itemsize * self.loop.engine.model.max_len

    @grpc_util.rpc
    def TransferKV(self, request_iterator, context):
        t0 = time.monotonic()
        faults.injector().check_call("transfer_fail")
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("a K/V transfer must start with a header")
        h = first.header
        if h.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {h.dtype!r}")
        params = params_from_pb(h.params)
        num_tokens = len(h.prompt_token_ids) + len(h.generated_token_ids)
        self.worker.check_header(h.request_id, DTYPES[h.dtype], tuple(h.shape), num_tokens, params)
        asm = KVAssembler(h.dtype, list(h.shape), h.nbytes, self.max_kv_bytes,
                          h.crc32 if h.HasField("crc32") else None)
        for chunk in request_iterator:
            if chunk.WhichOneof("payload") != "data":
                raise InvalidArgument("only data chunks may follow the header")
            asm.add(chunk.data)
        kv = asm.tensor()
        vocab = self.loop.engine.runner.vocab_size
        if h.next_token >= vocab:
            raise InvalidArgument(f"next_token must be in [0, {vocab})")
        req = Request(h.request_id, list(h.prompt_token_ids), params, output_ids=list(h.generated_token_ids))
        try:
            lp = logprobs_from_pb(h.next_token_logprobs) if h.HasField("next_token_logprobs") else None
            self.worker.admit(req, PrefillOutput(h.next_token, kv, lp), time.monotonic() - t0)
        except QueueFull as e:
            raise ResourceExhausted(str(e)) from None
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return decode_pb2.TransferKVResponse(queue_position=len(self.loop.engine.scheduler.prefilled))

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
            while True:
                try:
                    ev = stream.get(timeout=every)
                except queue.Empty:
                    yield from self._keepalive()
                    continue
                yield event_to_pb(ev)
                if ev.finish_reason is not None:
                    return
        except StreamClosed as e:
            # Closed without a last token: an abort while the engine runs, or the engine stopped.
            raise (Cancelled if self.loop.alive else Unavailable)(str(e)) from None
        finally:
            self.worker.release(rid)

    def _keepalive(self):
        """A keep-alive, only while the engine goes round: a hung engine falls silent."""
        if self.loop.alive and time.monotonic() - self.loop.last_beat < self.stall_s:
            yield KEEPALIVE

    @grpc_util.rpc
    def Abort(self, request, context):
        return prefill_pb2.AbortResponse(found=self.worker.abort(request.request_id))

    @grpc_util.rpc
    def Stats(self, request, context):
        return worker_stats(self.worker)


def worker_stats(worker: DecodeWorker) -> prefill_pb2.WorkerStatsResponse:
    s = worker.loop.engine.stats()
    return prefill_pb2.WorkerStatsResponse(
        running=s["running"], waiting=s["waiting"], batch_width=s["batch_width"], kv_cache_bytes=s["kv_cache_bytes"],
        completed=s.get("completed", 0), cancelled=s.get("cancelled", 0), kv_transfers=worker.transfers["count"],
        kv_bytes=worker.transfers["bytes"], kv_transfer_s=worker.transfers["seconds"], pid=os.getpid(),
        attached=sum(1 for x in list(worker.slots.values()) if x.attached), kv_used_bytes=s["kv_used_bytes"],
        faults_fired=faults.injector().counts(), max_batch=worker.loop.engine.config.max_batch)


class Watchdog(threading.Thread):
    """Health follows the engine: NOT_SERVING when its loop died or stalled with work to do.
    Also reclaims K/V that nobody attached to within the lease."""

    def __init__(self, worker: DecodeWorker, health, services: list[str], stall_s: float = STALL_S,
                 period_s: float = 0.5):
        super().__init__(name="decode-watchdog", daemon=True)
        self.worker, self.health, self.services = worker, health, services
        self.stall_s, self.period_s = stall_s, period_s
        self.stopped = threading.Event()

    def healthy(self) -> bool:
        loop = self.worker.loop
        stalled = loop.engine.has_work() and time.monotonic() - loop.last_beat > self.stall_s
        return loop.alive and not stalled

    def run(self) -> None:
        while not self.stopped.wait(self.period_s):
            grpc_util.set_health(self.health, self.services, self.healthy())
            self.worker.reap()


def serve(loop: EngineLoop, host: str = "127.0.0.1", port: int = 0, *, auth_token=None, tls_cert=None,
          tls_key=None, tls_client_ca=None, tls_root_cert=None, lease_s: float = 30.0, colocated: bool = False):
    """Start the Decode service on a running engine loop; returns (server, port, watchdog).
    `colocated`: the same server also serves the Prefill role (see decode_service/colocated.py)."""
    worker = DecodeWorker(loop, lease_s=lease_s)
    cfg = loop.engine.config
    server, bound = grpc_util.make_server(host, port, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                                          tls_client_ca=tls_client_ca,
                                          max_workers=grpc_util.worker_threads(cfg.max_batch, cfg.max_queue))
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(worker, attach_timeout_s=lease_s), server)
    services = [SERVICE]
    if colocated:
        from decode_service.colocated import ColocatedPrefill
        from prefill_service import server as prefill_server
        # A prefill for another decode worker runs on the engine's thread too, between two steps.
        remote = prefill_server.prefill_worker(
            loop.engine.prefiller, loop.engine.model.max_len, auth_token=auth_token, tls_cert=tls_cert,
            tls_key=tls_key, tls_root_cert=tls_root_cert,
            compute=lambda reqs: loop.call(lambda engine: engine.prefiller.prefill_many(reqs), timeout=None))
        prefill_server.add_servicer(ColocatedPrefill(worker, remote, f"{host}:{bound}"), server)
        services.append(prefill_server.SERVICE)
    health = grpc_util.add_health_and_reflection(server, services)
    server.start()
    grpc_util.set_health(health, services, loop.alive)
    watchdog = Watchdog(worker, health, services)
    watchdog.start()
    return server, bound, watchdog
