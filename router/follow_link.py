"""The router's end of Decode.Follow: one stream per decode worker for every request it runs there.

A request subscribes (`FollowLinks.attach`) and reads its TokenChunks from its own queue; one thread
per link reads the worker's StepTokens (one message per engine step) and puts each chunk in its
request's queue, so a client that reads slowly holds back nobody: its queue grows, the link's reader
never waits for it. A request may instead hand the reader a function (`Subscription.stream_to`) that
takes each chunk as it comes: then nothing wakes the request's own thread per step (the in-process
gateway's relay, router/request_run.py). A request that is done or gone is released on the link (the
worker frees its row before its next step). When the link fails or is cut for silence, every request
on it gets the failure and migrates (router/request_run.py); the next request to that worker opens a
new link.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from itertools import repeat

import grpc

from baton.v1 import decode_pb2
from router.registry import ChannelClosed

log = logging.getLogger(__name__)


class StreamEnd(Exception):
    """A request's stream ended without its last token; read like the grpc.RpcError its own
    Attach stream would have ended with (code(), details())."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(message)
        self._code, self._message, self.field = code, message, field

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


@dataclass
class Tokens:
    """A request's new tokens off its link (one step's, or several merged): what a TokenChunk holds."""
    token_ids: list[int]
    text: str
    finish_reason: int = 0
    logprobs: list = field(default_factory=list)   # common_pb2.TokenLogprobs, one per token, when asked

    def merge(self, more: "Tokens") -> "Tokens":
        self.token_ids += more.token_ids
        self.text += more.text
        self.logprobs += more.logprobs
        self.finish_reason = more.finish_reason
        return self


def _chunk(item):
    """A queued item as its reader takes it: the error as it is, or the chunk's Tokens."""
    return item if isinstance(item, Exception) else Tokens(item[0], item[1], item[2], list(item[3]))


def _code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


class Subscription:
    """One request's tokens off a link: iterate for Tokens, up to the one with a finish_reason."""

    def __init__(self, link: "FollowLink", request_id: str):
        self.link, self.request_id = link, request_id
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = None                  # stream_to's function, once given
        self._lock = threading.Lock()

    def put(self, item) -> None:
        """A chunk (token ids, text, finish reason, logprobs) or the error that ends the stream."""
        with self._lock:
            sink = self._sink
            if sink is None:
                self.items.put(item)
                return
        sink(_chunk(item))

    def stream_to(self, sink) -> None:
        """From now on call sink(Tokens or the ending error) with each item as it comes, on the thread
        that delivers it (the link's reader, or the one that fails the stream), instead of queueing
        it; the items queued so far go first. The sink must be quick and must not block."""
        with self._lock:
            while True:
                try:
                    item = self.items.get_nowait()
                except queue.Empty:
                    break
                sink(_chunk(item))
            self._sink = sink

    def __iter__(self):
        """Its Tokens, each holding all that were ready when the previous was taken."""
        while True:
            item = self.take()
            yield item
            if item.finish_reason:
                return

    def take(self) -> Tokens:
        """Waits for the next chunk, then merges in the rest that are ready (up to a last one or an
        error, which the next call raises)."""
        item = self.items.get()
        if isinstance(item, Exception):
            raise item
        tokens = _chunk(item)
        while not tokens.finish_reason:
            try:
                more = self.items.get_nowait()
            except queue.Empty:
                break
            if isinstance(more, Exception):
                self.items.put(more)   # after the tokens before it (nothing follows an error)
                break
            tokens.merge(Tokens(*more))
        return tokens

    def fail(self, err: Exception) -> None:
        """End the request's stream with err (its reader raises it)."""
        self.put(err)

    def release(self) -> None:
        """The router is done with the request: the worker frees its row if it still runs, and a
        reader still waiting for its tokens wakes up (to find its call over) instead of at the next
        silence check."""
        self.link.release(self.request_id)
        self.fail(StreamEnd(grpc.StatusCode.CANCELLED, "released"))

    @property
    def heard_s(self) -> float:
        return self.link.heard_s


class FollowLink:
    """One Follow call to one decode worker, shared by the requests this router runs there."""

    def __init__(self, handle, auth, keepalive_s: float, on_end):
        self.handle, self.on_end = handle, on_end
        self.lock = threading.Lock()
        self.subs: dict[str, Subscription] = {}
        self.ended: StreamEnd | None = None
        self.heard_s = time.monotonic()           # the last message from the worker (keep-alives too)
        self.out: queue.SimpleQueue = queue.SimpleQueue()   # FollowMessages to send; None ends the stream
        self.out.put(decode_pb2.FollowMessage(keepalive_s=keepalive_s))
        try:
            self.call = handle.stub.Follow(self._requests(), metadata=auth)
        except ChannelClosed:   # the worker registered again since this handle was picked: its requests fail over
            self.call, self.ended = None, StreamEnd(grpc.StatusCode.UNAVAILABLE, f"{handle.worker_id} registered again")
            return
        self.thread = threading.Thread(target=self._read, name=f"follow-{handle.worker_id}", daemon=True)
        self.thread.start()

    def _requests(self):
        while (m := self.out.get()) is not None:
            yield m

    def attach(self, request_id: str, timeout_s: float, prefill=None, attempt: int = 0) -> Subscription:
        """Listen to the request's K/V from prefill `attempt` on; with `prefill` (a PrefillRequest), have the
        colocated worker prefill it too."""
        sub = Subscription(self, request_id)
        with self.lock:
            if self.ended is not None:
                sub.fail(self.ended)
                return sub
            if request_id in self.subs:   # the router admits an id once; a second listener is refused
                sub.fail(StreamEnd(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} already has a listener"))
                return sub
            self.subs[request_id] = sub
        self.out.put(decode_pb2.FollowMessage(request_id=request_id, timeout_s=timeout_s, prefill=prefill,
                                              attempt=attempt))
        return sub

    def release(self, request_id: str) -> None:
        with self.lock:
            if self.subs.pop(request_id, None) is None or self.ended is not None:
                return          # finished (the worker let it go), ended, or released before
        self.out.put(decode_pb2.FollowMessage(request_id=request_id, release=True))

    def cut(self, why: str) -> None:
        """Give up on the link (its worker fell silent): every request on it fails over."""
        self._end(StreamEnd(grpc.StatusCode.UNAVAILABLE, why))
        if self.call is not None:
            self.call.cancel()

    def _read(self) -> None:
        try:
            for m in self.call:
                self.heard_s = time.monotonic()
                with self.lock:   # a row that finished is the worker's no more: no release for it
                    for rid, item in _rows(m):
                        sub = self.subs.pop(rid, None) if item[2] else self.subs.get(rid)
                        if sub is not None:
                            sub.put(item)
                for end in m.ends:
                    with self.lock:
                        sub = self.subs.pop(end.request_id, None)
                    if sub is not None:
                        sub.fail(StreamEnd(_code(end.code), end.message, end.field or None))
            err = StreamEnd(grpc.StatusCode.UNAVAILABLE, "the decode worker ended the follow stream")
        except grpc.RpcError as e:
            err = StreamEnd(e.code(), e.details() or e.code().name)
        self._end(err)

    def _end(self, err: StreamEnd) -> None:
        with self.lock:
            if self.ended is None:
                self.ended = err
            subs, self.subs = list(self.subs.values()), {}
        for sub in subs:
            sub.fail(err)
        self.out.put(None)
        self.on_end(self)


def _rows(m: decode_pb2.StepTokens):
    """(request id, (token ids, text, finish reason, logprobs)) of each row of a step's message: the
    tuple a Subscription queues, built per token, so no object beyond it (the router's hottest loop:
    every token of every request passes here)."""
    ids = m.token_ids
    if len(ids) == len(m.request_ids):   # one token a row (each has at least one): a single step's message
        yield from zip(m.request_ids, zip(([t] for t in ids), m.texts, m.finish_reasons, repeat(())))
    else:
        at = 0
        for rid, n, text, fin in zip(m.request_ids, m.counts, m.texts, m.finish_reasons):
            yield rid, (ids[at:(at := at + n)], text, fin, ())
    for c in m.chunks:
        yield c.request_id, (list(c.token_ids), c.text, c.finish_reason, list(c.logprobs))


class FollowLinks:
    """The router's links, one per decode worker (by id and address), opened on first use."""

    def __init__(self, auth, keepalive_s: float):
        self.auth, self.keepalive_s = auth, keepalive_s
        self.lock = threading.Lock()
        self.links: dict[tuple[str, str], FollowLink] = {}

    def attach(self, handle, request_id: str, timeout_s: float, prefill=None, attempt: int = 0) -> Subscription:
        key = (handle.worker_id, handle.address)
        with self.lock:
            link = self.links.get(key)
            if link is None or link.ended is not None:
                link = self.links[key] = FollowLink(handle, self.auth, self.keepalive_s, self._forget)
        return link.attach(request_id, timeout_s, prefill, attempt)

    def following(self) -> int:
        """Requests subscribed on all links (each relaying, or waiting for its first token)."""
        return sum(len(link.subs) for link in list(self.links.values()))

    def _forget(self, link: FollowLink) -> None:
        with self.lock:
            key = (link.handle.worker_id, link.handle.address)
            if self.links.get(key) is link:
                del self.links[key]

    def close(self) -> None:
        with self.lock:
            links, self.links = list(self.links.values()), {}
        for link in links:
            if link.call is not None:
                link.call.cancel()
