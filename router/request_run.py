"""One request's path through the router, from admission to its last token (RequestRun).

1. `relay` picks the least-loaded decode worker and subscribes to the request's tokens on the
   router's one stream to that worker (Decode.Follow, router/follow_link.py: one message per engine
   step for all of the router's requests there, keep-alives every `keepalive_s`);
2. `prefill_with_retry` has a prefill worker compute the prompt (+ tokens so far) and push the
   K/V straight to that decode worker; a prefill worker that fails, or that the health check
   finds down while the call is in flight, is left for another one (one failed call of another
   request does not take the call away: see _call_prefill); a client that goes away cancels it;
3. `relay` passes tokens on, paced (router/relay.py; for the gateway in this process the link's reader
   thread does); a decode worker that fails, is silent past `worker_silence_s`
   (stopped, hung, cut off) or is found down while prefill runs for it is left: `migrate` starts over
   at 1 on another decode worker with the tokens so far (re-prefilled, so nothing is lost or
   repeated);
4. `settle`, called once when the RPC ends however it ends, counts the outcome, frees what the
   request holds on every worker and gives back the load it reserved. A request counts as completed
   once its last message went out on a live call (`_tokens`), in the books and the metrics alike.
Failure kinds come from status codes and trailing metadata (`baton-failed-role`), never from text.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from baton import grpc_util
from baton.errors import BatonError, Cancelled, Unavailable
from baton.request import Status
from baton.sampling import SamplingParams
from baton.v1 import common_pb2, prefill_pb2, router_pb2
from baton.wire import FINISH_NAMES, params_to_pb
from router import metrics
from router.books import Books
from router.config import RouterConfig
from router.follow_link import FollowLinks, StreamEnd
from router.registry import ChannelClosed, Registry, WorkerHandle
from router.relay import messages as token_messages, pace_s

log = logging.getLogger(__name__)
# Codes that mean "that worker is gone or broken": try another one.
WORKER_FAILURE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
POLL_S = 0.1     # how often an in-flight Prefill looks at its client and its workers
PICK_POLL_S = 0.05   # how often a request with no live worker looks again


class WorkerFailed(Exception):
    """A worker failed this request (`role` says which side): retry or migrate."""

    def __init__(self, role: str, why: str):
        super().__init__(why)
        self.role, self.why = role, why


class RequestRun:
    def __init__(self, rid: str, ids: list[int], params: SamplingParams, context, *, registry: Registry,
                 config: RouterConfig, books: Books, auth, links: FollowLinks | None = None, counted: bool = True):
        self.rid, self.ids, self.params, self.context = rid, ids, params, context
        self.registry, self.config, self.books, self.auth = registry, config, books, auth
        self.counted = counted                      # False: the warm-up, in no book and no metric
        self.links = links                          # the router's Follow streams to decode workers
        self.status = Status.WAITING
        self.lock = threading.Lock()
        self.settled = False
        self.error: BaseException | None = None
        self.decode: WorkerHandle | None = None
        self.prefill: WorkerHandle | None = None
        self.held: list[WorkerHandle] = []          # loads reserved with registry.pick, not yet released
        self.attach = None                          # its Subscription on a Follow link (router/follow_link.py)
        self.heard_s: float | None = None           # last message read for it; None until
                                                    # it is relayed (prefill over): silence counts from then
        self.silent = False                         # the attach stream was cut for silence
        self.generated: list[int] = []
        self.failed_decodes: set[str] = set()
        self.migrations = 0
        self.prefill_attempts = 0                   # Prefill calls so far (PrefillRequest.attempt)
        self.arrival = time.monotonic()
        self.queue_s: float | None = None
        self.first_token_s: float | None = None
        self.kv_bytes, self.prefill_s, self.transfer_s = 0, 0.0, 0.0

    # ---- the flow ----------------------------------------------------------------------------
    def relay(self) -> Iterator[router_pb2.GenerateResponse]:
        while True:
            self._check_client()
            decode = self.decode = self._pick("decode", avoid=self.failed_decodes)
            try:
                self.silent, self.heard_s = False, None
                prefill = self._own_prefill(decode)   # a colocated worker's prompt rides on its stream
                # the K/V it takes: from this attempt on (a worker this request left may serve a later one)
                attempt = self.prefill_attempts if prefill is not None else self.prefill_attempts + 1
                self.attach = self.links.attach(decode, self.rid, self.config.attach_timeout_s, prefill, attempt)
                if self.queue_s is None:
                    self.queue_s = time.monotonic() - self.arrival
                if prefill is None:
                    self.prefill_with_retry(decode)
                yield from self._tokens()
                return
            except WorkerFailed as e:
                if e.role != "decode":
                    raise Unavailable(str(e)) from None
                self.migrate(decode, e.why)
            finally:
                self._release(decode)

    def _tokens(self) -> Iterator[router_pb2.GenerateResponse]:
        # Silence counts from here: while prefill runs (it may queue behind a burst) nobody reads the
        # stream, and the decode worker's liveness is the health check's (see _call_prefill).
        self.heard_s = time.monotonic()
        try:   # the in-process gateway's call can take messages from other threads (router/local_call.py)
            last = yield from token_messages(self.attach, getattr(self.context, "push", None), self._response,
                                             self._pace_s, self._check_client)
        except (grpc.RpcError, StreamEnd) as e:
            self._check_client()
            if self.silent:
                raise WorkerFailed("decode", f"silent for over {self.config.worker_silence_s:g} s") from None
            if e.code() not in WORKER_FAILURE:
                raise _from_rpc(e) from None
            raise WorkerFailed("decode", f"stream failed: {e.code().name}") from None
        if last is None:
            raise WorkerFailed("decode", "stream ended without a finish")
        yield last
        # gRPC resumes a stream only after the message went out on a live call (a local call: was handed
        # to a live call): a client that cancelled before it got the last token never reaches this line.
        with self.lock:   # from here settle counts it completed, so the metrics count it too
            completed = not self.settled   # (unless a cancel settled it in the meantime)
            if completed:
                self.status = Status.FINISHED
        if completed and self.counted:
            metrics.observe_request(last)
        log.info("request_id=%s outcome=completed finish=%s prompt_tokens=%d completion_tokens=%d "
                 "ttft_s=%.4f e2e_s=%.4f", self.rid, FINISH_NAMES[last.finish_reason],
                 len(self.ids), len(self.generated), last.ttft_s, last.e2e_s)

    def _response(self, ev) -> router_pb2.GenerateResponse:
        """The client's message for a chunk of tokens: the first also says the request's id and prompt
        size, the last its usage and timings."""
        self.heard_s = time.monotonic()
        if self.first_token_s is None:
            self.first_token_s = self.heard_s
            self._start_running()
        first = not self.generated
        self.generated.extend(ev.token_ids)
        resp = router_pb2.GenerateResponse(text=ev.text, token_ids=ev.token_ids, logprobs=ev.logprobs)
        if first:
            resp.request_id, resp.usage.prompt_tokens = self.rid, len(self.ids)
        if ev.finish_reason:
            self._fill_last(resp, ev.finish_reason)
        return resp

    def _pace_s(self) -> float:
        return pace_s(self.links.following()) if self.links is not None else 0.0

    def _fill_last(self, resp: router_pb2.GenerateResponse, finish_reason: int) -> None:
        now = time.monotonic()
        resp.finish_reason = finish_reason   # a worker's last event carries LENGTH or STOP, the proto's values
        resp.usage.prompt_tokens, resp.usage.completion_tokens = len(self.ids), len(self.generated)
        resp.ttft_s, resp.e2e_s, resp.queue_s = self.first_token_s - self.arrival, now - self.arrival, self.queue_s
        resp.prefill_s, resp.kv_transfer_s, resp.kv_bytes = self.prefill_s, self.transfer_s, self.kv_bytes
        resp.migrations, resp.request_id = self.migrations, self.rid
        resp.max_new_tokens = self.params.max_new_tokens
        if self.counted:
            self.books.add(kv_bytes=self.kv_bytes)

    def _own_prefill(self, decode: WorkerHandle) -> prefill_pb2.PrefillRequest | None:
        """For a colocated decode worker, the prefill it does itself (the one a Prefill call to it
        would ask, as prefill_with_retry would choose it: `prefer`), sent with the request's attach on
        its Follow stream; a refusal ends the request there (_tokens). None: a Prefill call it is."""
        if decode.role != "colocated" or self.links is None:
            return None
        req = self._prefill_request(decode)
        self.prefill = decode
        self.prefill_attempts += 1
        req.attempt = self.prefill_attempts
        return req

    def _prefill_request(self, decode: WorkerHandle) -> prefill_pb2.PrefillRequest:
        """The prompt and the tokens so far, their K/V for `decode`; the request is PREFILLING from here
        (a migration re-prefills a RUNNING request: it stays so)."""
        with self.lock:
            if self.status is Status.WAITING:
                self.status = Status.PREFILLING
        return prefill_pb2.PrefillRequest(request_id=self.rid, prompt_token_ids=self.ids,
                                          params=params_to_pb(self.params), decode_address=decode.address,
                                          generated_token_ids=self.generated)

    def prefill_with_retry(self, decode: WorkerHandle) -> None:
        req = self._prefill_request(decode)
        tried: set[str] = set()
        for _ in range(self.config.max_prefill_attempts):
            worker = self.prefill = self._pick("prefill", avoid=tried,
                                               prefer=decode if decode.role == "colocated" else None)
            self.prefill_attempts += 1
            req.attempt = attempt = self.prefill_attempts
            try:
                pre = self._call_prefill(worker, decode, req, retry=bool(tried))
                self.kv_bytes += pre.kv_bytes
                self.prefill_s += pre.compute_s
                self.transfer_s += pre.transfer_s
                return
            except WorkerFailed as e:
                if e.role != "prefill" or worker is decode:   # a colocated worker failing fails both roles
                    raise WorkerFailed("decode", e.why) from None
                tried.add(worker.worker_id)
                self.registry.mark_dead(worker, f"prefill failed: {e.why}")
                self.books.add(prefill_retries=1)
                log.warning("request %s: prefill on %s failed (%s); retrying elsewhere", self.rid, worker.worker_id, e.why)
                _in_background(self._abort, worker, attempt)   # that attempt only: a migration may come back
            finally:
                self._release(worker)
        raise Unavailable(f"prefill failed on {len(tried)} workers")

    def _call_prefill(self, worker: WorkerHandle, decode: WorkerHandle, req, retry: bool) -> prefill_pb2.PrefillResponse:
        """The Prefill call, cancelled as soon as the client goes away or the health check finds either
        worker down (a stopped or cut-off worker would hold it until its deadline). A worker marked
        dead because one call of another request failed is not left: this request's own calls fail
        if the worker really went (a refused or reset connection fails them at once), and leaving it
        would re-prefill every request in flight there and make each of them shun a live worker for
        good (with two workers per role, one more such fault then left them none: issue 21)."""
        try:
            call = worker.stub.Prefill.future(req, timeout=self.config.prefill_timeout_s, metadata=self.auth)
        except ChannelClosed:
            raise WorkerFailed("prefill", f"prefill worker {worker.worker_id} registered again") from None
        try:
            while True:
                try:
                    return call.result(timeout=POLL_S)
                except grpc.FutureTimeoutError:
                    pass
                if not self.context.is_active():
                    raise Cancelled("client went away")
                for w, role in ((decode, "decode"), (worker, "prefill")):
                    if w.health_down:
                        raise WorkerFailed(role, f"{role} worker {w.worker_id} found down during prefill")
        except grpc.RpcError as e:
            self._check_client()
            if e.code() == grpc.StatusCode.ALREADY_EXISTS and retry:
                return prefill_pb2.PrefillResponse()  # an earlier worker's transfer had landed after all
            role = grpc_util.failed_role(e)
            if role is not None:
                raise WorkerFailed(role, f"{role} side failed: {e.code().name}") from None
            if e.code() not in WORKER_FAILURE:
                raise _from_rpc(e) from None  # the decode side refused it, or a bad request
            raise WorkerFailed("prefill", e.code().name) from None
        finally:
            call.cancel()  # a no-op once it has finished

    def migrate(self, decode: WorkerHandle, why: str) -> None:
        """Leave a failed decode worker: the next round re-prefills prompt + tokens so far elsewhere."""
        self.registry.mark_dead(decode, why)
        self.failed_decodes.add(decode.worker_id)
        if self.attach is not None:
            self.attach.release()
        _in_background(self._abort, decode, self.prefill_attempts)   # a stopped worker answers late or never
        self.migrations += 1
        self.books.add(migrations=1)
        if self.migrations > self.config.max_migrations:
            raise Unavailable(f"request {self.rid} failed on {self.migrations} decode workers")
        log.warning("request %s: decode worker %s failed (%s); migrating with %d tokens",
                    self.rid, decode.worker_id, why, len(self.generated))

    def check_silence(self, now: float) -> None:
        """Called by the liveness watcher: cut the request's stream once its decode worker has been
        silent too long (no message on its link, keep-alives included) while the request relays."""
        attach, heard = self.attach, self.heard_s
        if attach is None or heard is None or self.silent:
            return
        if now - max(heard, attach.heard_s) > self.config.worker_silence_s:
            self.silent = True
            attach.fail(StreamEnd(grpc.StatusCode.UNAVAILABLE, "decode worker silent"))
            attach.link.cut(f"decode worker silent for over {self.config.worker_silence_s:g} s")

    # ---- books and resources ------------------------------------------------------------------
    def _pick(self, role: str, **kw) -> WorkerHandle:
        """A live worker for the role, waiting up to worker_wait_s for one (see RouterConfig)."""
        deadline = time.monotonic() + self.config.worker_wait_s
        while True:
            try:
                w = self.registry.pick(role, **kw)
                break
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                self._check_client()
                time.sleep(PICK_POLL_S)
        with self.lock:
            self.held.append(w)
        return w

    def _release(self, w: WorkerHandle) -> None:
        with self.lock:
            if w not in self.held:
                return
            self.held.remove(w)
        self.registry.release(w)

    def _start_running(self) -> None:
        with self.lock:
            if not self.settled and self.status in (Status.WAITING, Status.PREFILLING):
                self.status = Status.RUNNING
                self.books.start_running()

    def _check_client(self) -> None:
        if not self.context.is_active():
            raise Cancelled("client went away")

    def settle(self) -> None:
        """Once, when the RPC ends however it ends: count the outcome, free everything it holds."""
        with self.lock:
            if self.settled:
                return
            self.settled = True
            if self.status is not Status.FINISHED:
                failed = self.error is not None and not isinstance(self.error, Cancelled)
                was_running, self.status = self.status is Status.RUNNING, Status.FAILED if failed else Status.CANCELLED
            else:
                was_running = True
            held, self.held = self.held, []
            self.books.settle(self.rid, was_running, self.status, self.counted)
        for w in held:
            self.registry.release(w)
        if self.status is not Status.FINISHED:
            if self.attach is not None:
                self.attach.release()   # the worker frees its row before its next step
            _in_background(lambda: (self._abort(self.decode), self._abort(self.prefill)))

    def _abort(self, worker: WorkerHandle | None, attempt: int = 0) -> None:
        """Drop the request on a worker: its attempts up to `attempt` (a prefill worker may serve a
        later one: a retry elsewhere, then a migration), or every one (0: the request is over)."""
        if worker is None:
            return
        try:
            worker.stub.Abort(common_pb2.AbortRequest(request_id=self.rid, attempt=attempt), timeout=2,
                              metadata=self.auth)
        except (grpc.RpcError, ChannelClosed):
            pass  # dead workers hold nothing


def _in_background(fn, *args) -> None:
    threading.Thread(target=fn, args=args, daemon=True).start()


def _from_rpc(e: grpc.RpcError) -> BatonError:
    err = BatonError(e.details() or e.code().name, field=getattr(e, "field", None) or grpc_util.field_of(e))
    err.code_name = e.code().name
    return err
