"""Decode.Follow: one stream per router, one message per engine step with every request's new tokens.

With a per-request Attach stream, each request's tokens cost a message (and a gRPC thread's wake-up)
in the worker and in the router; at 256 requests that was ~1000 messages a second each way, most of
the worker's request-path CPU. On a Follow stream the router names the requests it listens to
(FollowMessage), and the worker answers once per engine step with all of their new tokens
(StepTokens): messages follow the step rate, not the request count.

Per request the rules are Attach's (decode_service/worker.py): the K/V and the listener race, each
for a bounded wait (DEADLINE_EXCEEDED); one listener per request (ALREADY_EXISTS); an abort before
the K/V leaves a tombstone (NOT_FOUND); a release, or the stream's end (the router went away), frees
the row before the next step. Keep-alives go out only while the engine goes round, so a stalled
worker falls silent on every request at once. A router that reads slowly holds back only its own
stream: the engine puts tokens in each request's queue and never waits for a sender.
"""
from __future__ import annotations

import queue
import threading
import time

from baton import faults
from baton.engine.loop import StreamClosed, TokenStream
from baton.engine.scheduler import QueueFull
from baton.errors import BatonError
from baton.request import Request
from baton.v1 import decode_pb2
from baton.wire import events_to_pb, params_from_pb

KEEPALIVE = decode_pb2.StepTokens(keepalive=True)
WAIT_POLL_S = 0.05    # how often a request still waiting for its K/V is looked at again


class Follow:
    """One router's Follow stream on this worker: `messages()` is what the RPC yields."""

    def __init__(self, worker, attach_timeout_s: float, stall_s: float, colocated=None):
        self.worker, self.loop = worker, worker.loop
        self.colocated = colocated        # a colocated worker's Prefill role (ColocatedPrefill), else None
        self.attach_timeout_s, self.stall_s = attach_timeout_s, stall_s
        self.keepalive_s: float | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()   # FollowMessages, None when the router's side ended
        self.wake = threading.Event()
        self.attached: dict[str, TokenStream] = {}            # requests whose tokens go out here
        self.waiting: dict[str, tuple[float, int]] = {}       # request -> (deadline for its K/V, first attempt taken)
        self.ends: list[decode_pb2.RequestEnd] = []
        self.first = threading.Event()                        # the router's first message came (keepalive_s)
        self.error: BatonError | None = None                  # what ended the router's side, if not its close

    # ---- the router's side: read on a thread of its own ----------------------------------------
    def read(self, requests) -> None:
        """Take the router's messages as they come. A release frees the row here and now, not when
        the sender next goes round (it may be blocked on a slow router)."""
        try:
            for m in requests:
                if self.keepalive_s is None:
                    self.keepalive_s = m.keepalive_s or None
                    self.first.set()
                if m.release:
                    self.worker.release(m.request_id)
                self.inbox.put(m)
                if m.HasField("prefill"):   # after its attach, so that a refusal ends a request the sender follows
                    refused = self._prefill(m.prefill)
                    if refused is not None:
                        self.inbox.put(refused)
                self.wake.set()
        except BatonError as e:   # a message that is no FollowMessage (baton.grpc_util): the call's status
            self.error = e
        except Exception:   # grpc.RpcError: the call ended; messages() sees it by the None below
            pass
        finally:
            self.first.set()
            self.inbox.put(None)
            self.wake.set()

    def _prefill(self, p) -> decode_pb2.RequestEnd | None:
        """A prompt for this worker's own batch (as ColocatedPrefill serves a Prefill call naming it);
        its refusal, if refused."""
        rid = p.request_id
        try:
            if self.colocated is None:
                raise BatonError("this worker is not colocated: send the prompt to a prefill worker")
            faults.injector().check_call("prefill_fail")
            req = Request(rid, list(p.prompt_token_ids), params_from_pb(p.params), output_ids=list(p.generated_token_ids),
                          attempt=p.attempt)
            self.colocated.prefill(req, self.colocated.own_address, p.attempt)
            return None
        except BatonError as e:
            return decode_pb2.RequestEnd(request_id=rid, code=e.code_name, message=str(e), field=e.field or "")
        except QueueFull as e:
            return decode_pb2.RequestEnd(request_id=rid, code="RESOURCE_EXHAUSTED", message=str(e))
        except Exception as e:   # a bug: the request fails over, the stream goes on
            return decode_pb2.RequestEnd(request_id=rid, code="INTERNAL", message=f"{type(e).__name__}: {e}")

    # ---- the worker's side: the RPC's response stream -------------------------------------------
    def messages(self, context):
        stop_listening = self.loop.listen(self.wake.set)
        self.worker.follows.add(self)
        try:
            self.first.wait(self.attach_timeout_s)
            last_sent = time.monotonic()
            while True:
                self.wake.wait(self._wait_s(last_sent))
                self.wake.clear()
                if not self._take_inbox():
                    if self.error is not None:
                        raise self.error
                    return
                out = self._collect()
                if out.request_ids or out.chunks or out.ends:
                    yield out
                    last_sent = time.monotonic()
                elif (self.keepalive_s and time.monotonic() - last_sent >= self.keepalive_s
                      and self.loop.beating(self.stall_s)):   # a hung engine falls silent
                    yield KEEPALIVE
                    last_sent = time.monotonic()
                if (self.worker.ending.is_set() or not self.loop.alive) and not self.attached and not self.waiting:
                    return
        finally:
            stop_listening()
            self.worker.follows.discard(self)
            for rid in [*self.attached, *self.waiting]:   # the router went away: free what it held
                self.worker.release(rid)
            self.attached.clear()
            self.waiting.clear()

    def _wait_s(self, last_sent: float) -> float:
        wait = self.keepalive_s - (time.monotonic() - last_sent) if self.keepalive_s else 1.0
        if self.waiting:
            wait = min(wait, WAIT_POLL_S)
        return max(0.0, wait)

    def _take_inbox(self) -> bool:
        """Apply the router's messages; False once its side has ended."""
        while True:
            try:
                m = self.inbox.get_nowait()
            except queue.Empty:
                return True
            if m is None:
                return False
            if isinstance(m, decode_pb2.RequestEnd):   # its prefill was refused
                self._fail(m.request_id, BatonError(m.message), m.code, m.field)
                continue
            rid = m.request_id
            if not rid:          # the first message may only set keepalive_s
                continue
            if m.release:
                self.attached.pop(rid, None)
                self.waiting.pop(rid, None)
            elif rid in self.attached or rid in self.waiting:
                self._end(rid, "ALREADY_EXISTS", f"request {rid!r} already has a listener")
            else:
                self.waiting[rid] = (time.monotonic() + (m.timeout_s or self.attach_timeout_s), m.attempt)
                try:
                    faults.injector().check_call("attach_fail")
                except BatonError as e:
                    self._fail(rid, e)

    def _collect(self) -> decode_pb2.StepTokens:
        """The step's message: new tokens of every attached request, and the requests that ended."""
        now = time.monotonic()
        for rid, (deadline, attempt) in list(self.waiting.items()):
            try:
                stream = self.worker.try_attach(rid, 0, attempt)
            except BatonError as e:
                self._fail(rid, e)
                continue
            if stream is not None:
                del self.waiting[rid]
                self.attached[rid] = stream
            elif now >= deadline:
                self._fail(rid, BatonError(f"no K/V for request {rid!r} within its timeout"), "DEADLINE_EXCEEDED")
        ids, counts, tokens, texts, finishes, chunks = [], [], [], [], [], []
        for rid, stream in list(self.attached.items()):
            try:
                events = stream.take_ready()
            except StreamClosed as e:   # closed without a last token: aborted, or the engine stopped
                self._fail(rid, e, "CANCELLED" if self.loop.alive else "UNAVAILABLE")
                continue
            if not events:
                continue
            last = events[-1]
            if last.logprobs is not None or events[0].logprobs is not None:   # rare: the whole chunk, logprobs and all
                chunk = events_to_pb(events)
                chunk.request_id = rid
                chunks.append(chunk)
            else:
                ids.append(rid)
                counts.append(len(events))
                if len(events) == 1:   # the usual: one step's token (this loop runs for every token served)
                    tokens.append(last.token_id)
                    texts.append(last.text)
                else:
                    tokens.extend([e.token_id for e in events])
                    texts.append("".join([e.text for e in events]))
                finishes.append(int(last.finish_reason or 0))
            if last.finish_reason is not None:
                del self.attached[rid]
                self.worker.release(rid)   # its slot; the engine has already let it go
        out = decode_pb2.StepTokens(request_ids=ids, counts=counts, token_ids=tokens, texts=texts,
                                    finish_reasons=finishes, chunks=chunks, ends=self.ends)
        self.ends = []
        return out

    def _fail(self, rid: str, e: Exception, code: str | None = None, field: str = "") -> None:
        """The request ends here without a last token: its status goes to the router, its row is freed."""
        self.waiting.pop(rid, None)
        self.attached.pop(rid, None)
        code = code or getattr(e, "code_name", "UNKNOWN")
        self._end(rid, code, str(e), field)
        if code != "ALREADY_EXISTS":   # the request is another listener's: leave it be
            self.worker.release(rid)

    def _end(self, rid: str, code: str, message: str, field: str = "") -> None:
        self.ends.append(decode_pb2.RequestEnd(request_id=rid, code=code, message=message, field=field))
