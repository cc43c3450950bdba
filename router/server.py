"""The baton.v1.Router service: validate, admit, pick workers, stream tokens back.

A request's path: validate and tokenize -> admit (bounded queue, RESOURCE_EXHAUSTED past it)
-> pick the least-loaded decode worker and open its token stream (Attach) -> prefill on the
least-loaded prefill worker, which pushes the K/V straight to that decode worker (retried on
another prefill worker if one fails) -> relay tokens. If the decode worker dies mid-stream,
the request is migrated: prompt + tokens so far are prefilled again for another decode
worker and the stream goes on. A client that goes away aborts the request on both sides.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from baton import grpc_util
from baton.errors import (AlreadyExists, BatonError, Cancelled, FailedPrecondition, InvalidArgument,
                          ResourceExhausted, Unavailable)
from baton.model_loader import encode_prompt
from baton.sampling import SamplingParams
from baton.v1 import decode_pb2, prefill_pb2, router_pb2, router_pb2_grpc
from baton.wire import params_to_pb
from router import metrics
from router.limits import Limits, check_prompt, check_request_id, validate_sampling
from router.registry import Registry, WorkerHandle

log = logging.getLogger(__name__)
SERVICE = "baton.v1.Router"
# Codes that mean "that worker is gone or broken": try another one.
WORKER_FAILURE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class RouterConfig:
    max_queue: int = 256                 # accepted requests not yet decoding
    max_running: int = 1024              # concurrent streams
    default_max_new_tokens: int = 128
    prefill_timeout_s: float = 120.0
    attach_timeout_s: float = 130.0
    max_prefill_attempts: int = 3
    max_migrations: int = 3
    auth_token: str | None = None
    max_message_bytes: int = grpc_util.MAX_MESSAGE_BYTES


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()

    def add(self, **kw) -> None:
        with self.lock:
            self.c.update(kw)

    def __getitem__(self, k):
        return self.c[k]

    def snapshot(self) -> collections.Counter:
        with self.lock:
            return collections.Counter(self.c)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, registry: Registry, tokenizer, context_len: int, model_name: str,
                 config: RouterConfig = RouterConfig(), limits: Limits = Limits(), scaler=None):
        self.registry, self.tokenizer, self.context_len = registry, tokenizer, context_len
        self.model_name, self.config, self.limits = model_name, config, limits
        self.scaler = scaler                  # callable(role, count) -> count, from the deployment
        self.auth = grpc_util.auth_metadata(config.auth_token)
        self.counts = Counters()
        self.waiting = 0
        self.running = 0
        self.admit_lock = threading.Lock()
        self.active_ids: set[str] = set()

    # ---- Generate -------------------------------------------------------------------------
    def _parse(self, r: router_pb2.GenerateRequest) -> tuple[str, list[int], SamplingParams]:
        rid = r.request_id or uuid.uuid4().hex
        check_request_id(self.limits, rid)
        params = validate_sampling(
            self.limits, max_new_tokens=r.max_new_tokens or self.config.default_max_new_tokens,
            temperature=r.temperature, top_p=r.top_p or 1.0, top_k=r.top_k,
            seed=r.seed if r.HasField("seed") else None, stop=list(r.stop), ignore_eos=r.ignore_eos)
        if r.prompt_token_ids:
            ids = list(r.prompt_token_ids)
            # Without a tokenizer the prefill worker checks ids against the model's vocabulary.
            if self.tokenizer is not None and max(ids) >= len(self.tokenizer):
                raise InvalidArgument(f"prompt_token_ids must be in [0, {len(self.tokenizer)})")
        else:
            if len(r.prompt) > self.limits.max_prompt_chars:
                raise InvalidArgument(f"prompt has {len(r.prompt)} characters; at most {self.limits.max_prompt_chars}")
            if not r.prompt.strip():
                raise InvalidArgument("prompt must not be empty")
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer: send prompt_token_ids")
            ids = encode_prompt(self.tokenizer, r.prompt, r.raw)
        check_prompt(self.limits, len(ids), params.max_new_tokens, self.context_len)
        return rid, ids, params

    def _admit(self) -> None:
        with self.admit_lock:
            if self.waiting >= self.config.max_queue or self.waiting + self.running >= self.config.max_running:
                self.counts.add(rejected=1)
                raise ResourceExhausted(f"server is at capacity ({self.waiting} waiting, {self.running} running; "
                                        f"queue limit {self.config.max_queue}); retry later")
            self.waiting += 1

    def _start_running(self, state: dict) -> None:
        with self.admit_lock:
            if not state["settled"]:
                state["phase"] = "running"
                self.waiting -= 1
                self.running += 1

    @grpc_util.rpc
    def Generate(self, request, context):
        rid, ids, params = self._parse(request)
        with self.admit_lock:
            if rid in self.active_ids:
                raise AlreadyExists(f"request_id {rid!r} is already in flight")
            self.active_ids.add(rid)
        try:
            self._admit()
        except BatonError:
            with self.admit_lock:
                self.active_ids.discard(rid)
            raise
        state = {"phase": "waiting", "done": False, "error": None, "decode": None, "prefill": None, "settled": False}
        if not context.add_callback(lambda: self._settle(rid, state)):
            self._settle(rid, state)
            return
        try:
            yield from self._generate(rid, ids, params, context, state)
        except BatonError as e:
            state["error"] = e
            log.info("request %s ended: %s %s", rid, e.code_name, e)
            raise

    def _settle(self, rid: str, state: dict) -> None:
        """Runs once when the RPC ends, however it ends: the one place that settles the books.
        The outcome is counted in the same critical section that takes the request off
        running/waiting, so a Stats read never sees it in neither; what it held is freed after."""
        if state["done"]:
            outcome = "completed"
        else:
            failed = state["error"] is not None and not isinstance(state["error"], Cancelled)
            outcome = "failed" if failed else "cancelled"
        with self.admit_lock:
            if state["settled"]:
                return
            state["settled"] = True
            self.waiting -= state["phase"] == "waiting"
            self.running -= state["phase"] == "running"
            self.active_ids.discard(rid)
            self.counts.add(**{outcome: 1})
        if outcome != "completed":
            try:  # the client went away or it failed: free what it held
                self._abort_everywhere(rid, state)
            except Exception:
                log.exception("request %s: freeing its workers failed", rid)

    def _generate(self, rid, ids, params, context, state):
        arrival = time.monotonic()
        generated: list[int] = []
        failed_decodes: set[str] = set()
        migrations, first_token_s, kv_bytes, prefill_s, transfer_s, queue_s = 0, None, 0, 0.0, 0.0, None
        while True:
            if not context.is_active():
                raise Cancelled("client went away")
            decode = self.registry.pick("decode", exclude=failed_decodes)
            state["decode"] = decode
            try:
                attach = decode.stub.Attach(decode_pb2.AttachRequest(request_id=rid, timeout_s=self.config.attach_timeout_s),
                                            metadata=self.auth)
                state["attach"] = attach
                if queue_s is None:
                    queue_s = time.monotonic() - arrival
                pre = self._prefill(rid, ids, generated, params, decode, state, context)
                kv_bytes += pre.kv_bytes
                prefill_s += pre.compute_s
                transfer_s += pre.transfer_s
                for ev in attach:
                    if first_token_s is None:
                        first_token_s = time.monotonic()
                        self._start_running(state)
                    generated.append(ev.token_id)
                    resp = router_pb2.GenerateResponse(text=ev.text, token_ids=[ev.token_id])
                    if not generated[:-1]:
                        resp.request_id = rid
                    if ev.finish_reason:
                        now = time.monotonic()
                        resp.finish_reason = ev.finish_reason if ev.finish_reason in (1, 2) else 2
                        resp.usage.prompt_tokens, resp.usage.completion_tokens = len(ids), len(generated)
                        resp.ttft_s, resp.e2e_s, resp.queue_s = first_token_s - arrival, now - arrival, queue_s
                        resp.prefill_s, resp.kv_transfer_s, resp.kv_bytes = prefill_s, transfer_s, kv_bytes
                        resp.migrations, resp.request_id = migrations, rid
                        self.counts.add(kv_bytes=kv_bytes)
                        yield resp
                        # gRPC resumes a stream only after the message went out on a live call: a
                        # client that cancelled before it got the last token never reaches this line.
                        state["done"] = True
                        metrics.observe_request(resp)
                        log.info("request_id=%s outcome=completed finish=%s prompt_tokens=%d completion_tokens=%d "
                                 "ttft_s=%.4f e2e_s=%.4f", rid, ("", "length", "stop")[resp.finish_reason],
                                 len(ids), len(generated), resp.ttft_s, resp.e2e_s)
                        return
                    yield resp
                raise _StreamBroke("decode stream ended without a finish")
            except (grpc.RpcError, _StreamBroke) as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNAVAILABLE
                if not context.is_active():
                    raise Cancelled("client went away") from None
                if code not in WORKER_FAILURE and not isinstance(e, _StreamBroke):
                    raise _from_rpc(e) from None
                # The decode worker failed: migrate to another one with the tokens so far.
                self.registry.mark_dead(decode, f"stream failed: {code.name}")
                failed_decodes.add(decode.worker_id)
                self._abort(decode, rid)
                migrations += 1
                self.counts.add(migrations=1)
                if migrations > self.config.max_migrations:
                    raise Unavailable(f"request {rid} failed on {migrations} decode workers") from None
                log.warning("request %s: decode worker %s failed (%s); migrating with %d tokens",
                            rid, decode.worker_id, code.name, len(generated))
            finally:
                self.registry.release(decode)

    def _prefill(self, rid, ids, generated, params, decode: WorkerHandle, state, context):
        req = prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, params=params_to_pb(params),
                                         decode_address=decode.address, generated_token_ids=generated)
        tried: set[str] = set()
        for attempt in range(self.config.max_prefill_attempts):
            worker = self.registry.pick("prefill", exclude=tried, prefer=decode if decode.role == "colocated" else None)
            state["prefill"] = worker
            try:
                return worker.stub.Prefill(req, timeout=self.config.prefill_timeout_s, metadata=self.auth)
            except grpc.RpcError as e:
                if not context.is_active():
                    raise Cancelled("client went away") from None
                if e.code() == grpc.StatusCode.ALREADY_EXISTS and tried:
                    return prefill_pb2.PrefillResponse()  # a failed worker's transfer had landed after all
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION or e.code() not in WORKER_FAILURE:
                    raise  # the decode side refused it, or a bad request: not this prefill worker's fault
                if "decode worker" in (e.details() or ""):
                    raise  # the decode worker is unreachable: migrate rather than retry prefill
                tried.add(worker.worker_id)
                self.registry.mark_dead(worker, f"prefill failed: {e.code().name}")
                self.counts.add(prefill_retries=1)
                log.warning("request %s: prefill on %s failed (%s); retrying elsewhere", rid, worker.worker_id, e.code().name)
            finally:
                self.registry.release(worker)
        raise Unavailable(f"prefill failed on {len(tried)} workers")

    def _abort(self, worker: WorkerHandle | None, rid: str) -> None:
        if worker is None:
            return
        try:
            worker.stub.Abort(prefill_pb2.AbortRequest(request_id=rid), timeout=2, metadata=self.auth)
        except grpc.RpcError:
            pass  # dead workers hold nothing

    def _abort_everywhere(self, rid: str, state: dict) -> None:
        attach = state.get("attach")
        if attach is not None:
            attach.cancel()
        threading.Thread(target=lambda: (self._abort(state.get("decode"), rid), self._abort(state.get("prefill"), rid)),
                         daemon=True).start()

    # ---- Stats / admin ------------------------------------------------------------------------
    def stats_pb(self) -> router_pb2.StatsResponse:
        with self.admit_lock:  # one snapshot: running/waiting and the outcome counters agree
            running, waiting, c = self.running, self.waiting, self.counts.snapshot()
        return router_pb2.StatsResponse(
            running=running, waiting=waiting, prefill_workers=len(self.registry.live("prefill")),
            decode_workers=len(self.registry.live("decode")), completed=c["completed"], failed=c["failed"],
            cancelled=c["cancelled"], rejected=c["rejected"], prefill_retries=c["prefill_retries"],
            migrations=c["migrations"], kv_bytes=c["kv_bytes"])

    @grpc_util.rpc
    def Stats(self, request, context):
        return self.stats_pb()

    @grpc_util.rpc
    def Status(self, request, context):
        workers = []
        with self.registry.lock:
            handles = list(self.registry.workers.values())
        for w in handles:
            try:
                s = w.stub.Stats(prefill_pb2.WorkerStatsRequest(), timeout=1, metadata=self.auth)
                w.stats = {"running": s.running, "waiting": s.waiting, "batch_width": s.batch_width,
                           "kv_cache_bytes": s.kv_cache_bytes, "kv_used_bytes": s.kv_used_bytes}
            except grpc.RpcError:
                pass
            workers.append(w.to_pb())
        return router_pb2.StatusResponse(workers=workers, stats=self.stats_pb(), max_queue=self.config.max_queue,
                                         model=self.model_name, topology=self.registry.topology())

    @grpc_util.rpc
    def Scale(self, request, context):
        if request.role not in ("prefill", "decode", "colocated"):
            raise InvalidArgument(f"role must be 'prefill', 'decode' or 'colocated', got {request.role!r}")
        if not 1 <= request.count <= 64:
            raise InvalidArgument(f"count must be in [1, 64], got {request.count}")
        if self.scaler is None:
            raise FailedPrecondition("scaling needs a deployment that can start workers (baton up)")
        return router_pb2.ScaleResponse(count=self.scaler(request.role, request.count))

    @grpc_util.rpc
    def RegisterWorker(self, request, context):
        self.registry.register(request.worker)
        return router_pb2.RegisterWorkerResponse()

    @grpc_util.rpc
    def DeregisterWorker(self, request, context):
        self.registry.deregister(request.worker_id)
        return router_pb2.DeregisterWorkerResponse()


class _StreamBroke(Exception):
    pass


def _from_rpc(e: grpc.RpcError) -> BatonError:
    err = BatonError(e.details() or e.code().name)
    err.code_name = e.code().name
    return err
