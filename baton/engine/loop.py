"""Runs an Engine on its own thread and streams each request's tokens to its caller.

The engine is single-threaded: every call from other threads (submit, abort, call) goes
through the loop's inbox and is applied between two steps. Each request gets a `TokenStream`.
Other threads never touch the engine: what they may know of it is `info` (facts fixed when it was
built), `stats` (its counters as of the loop's last round) and the queue count the loop publishes.

Given a factory instead of an Engine, the loop thread also builds the engine (loads the model):
then one thread does all of the process's model work, which is what torch's OpenMP needs on a
CPU (see baton/device_thread.py).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.prefill import PrefillOutput
from baton.engine.scheduler import QueueFull
from baton.request import Request, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What other threads may read of the engine: facts fixed when it was built."""
    config: EngineConfig
    max_len: int                             # prompt + output tokens a request may reach
    kv_shape: tuple[int, int, int, int]      # (L, 2, Hkv, D) of one token's K/V
    dtype: torch.dtype                       # the model's, and its K/V's
    device: torch.device
    vocab_size: int
    tokenizer: object                        # None for a tiny test model
    grammars: object                         # baton.grammar.Grammars: compiles requests' constraints
    description: str                         # the cache's size and how a step runs, for the start-up log

    @staticmethod
    def of(engine: Engine) -> "EngineInfo":
        r = engine.runner
        return EngineInfo(engine.config, engine.max_len, (r.num_layers, 2, r.num_kv_heads, r.head_dim), r.dtype,
                          r.device, r.vocab_size, engine.model.tokenizer, engine.model.grammars, engine.describe())


class StreamClosed(Exception):
    """The request ended without a final token: cancelled, or the engine failed/stopped."""


class TokenStream:
    """The events of one request, in order, ending with the one that has a finish_reason."""

    def __init__(self, loop: "EngineLoop", request: Request):
        self.loop, self.request = loop, request
        self.events: queue.SimpleQueue[TokenEvent | Exception] = queue.SimpleQueue()
        self._error: Exception | None = None     # an end get_ready found behind ready events

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self.events.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def get(self, timeout: float | None = None) -> TokenEvent:
        item = self.events.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def take_ready(self) -> list[TokenEvent]:
        """Every event that is ready, without waiting ([] if none), up to and including a last one; an
        end without a last token (StreamClosed) is raised once the events before it are taken. A
        Follow stream asks this of every request each step, so an empty queue costs one check."""
        if self._error is not None:
            raise self._error
        out, events = [], self.events
        while not events.empty():
            item = events.get_nowait()
            if isinstance(item, Exception):
                if not out:
                    raise item
                self._error = item
                break
            out.append(item)
            if item.finish_reason is not None:
                break
        return out

    def get_ready(self, timeout: float | None = None) -> list[TokenEvent]:
        """Every event that is ready, in order: waits up to `timeout` for the first (queue.Empty if
        none came), then takes the rest without waiting, up to and including the last one. An end
        without a last token (StreamClosed) is raised once the events before it are taken."""
        if self._error is not None:
            raise self._error
        out = [self.get(timeout)]
        while out[-1].finish_reason is None:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Exception):
                self._error = item
                break
            out.append(item)
        return out


class EngineLoop:
    def __init__(self, engine: Engine | Callable[[], Engine], idle_wait_s: float = 0.05):
        self._make = engine if callable(engine) and not isinstance(engine, Engine) else None
        self.engine: Engine | None = None if self._make else engine   # the loop thread's alone
        self.info: EngineInfo | None = None if self._make else EngineInfo.of(engine)
        self.ready = threading.Event()      # the engine exists (built on the loop thread, if given a factory)
        self.idle_wait_s = idle_wait_s
        self.streams: dict[str, TokenStream] = {}
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.last_beat = time.monotonic()   # health: when the loop last went round
        self.error: BaseException | None = None
        self.stats: dict = {}               # Engine.stats() as of the loop's last round (for other threads)
        self._has_work = False              # the engine held requests, as of the loop's last round
        # The queue cap, counted without reading the engine: requests waiting in it as the loop last
        # published (after each drain and step, under the lock), plus submissions not yet applied.
        self._waiting = 0
        self._pending_new = 0
        self._applied = 0                   # submissions applied since the last publish (loop thread only)
        self._listeners: list[Callable[[], None]] = []   # told when streams got events (decode_service/follow.py)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)

    def start(self, timeout: float | None = None) -> "EngineLoop":
        """Start the loop thread; returns once the engine exists (re-raises its construction error)."""
        self.thread.start()
        self.ready.wait(timeout)
        if self.info is None:
            raise RuntimeError("the engine could not be built") from self.error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def has_work(self) -> bool:
        """Whether the engine held requests as of the loop's last round, or some are on their way."""
        return self._has_work or not self.inbox.empty()

    def beating(self, stall_s: float) -> bool:
        """Whether the loop runs and went round within `stall_s`: keep-alives go out only then, so a
        hung engine falls silent to its listeners."""
        return self.alive and time.monotonic() - self.last_beat < stall_s

    def stalled(self, stall_s: float) -> bool:
        """Whether the loop has not gone round for `stall_s` while it had work (health)."""
        return self.has_work() and time.monotonic() - self.last_beat > stall_s

    # ---- called from any thread ----------------------------------------------------------
    def _enqueue_new(self, req: Request, add: Callable[[], None]) -> TokenStream:
        max_queue = self.info.config.max_queue
        with self._lock:
            if self._waiting + self._pending_new >= max_queue:
                raise QueueFull(f"queue is full ({max_queue} waiting)")
            if req.request_id in self.streams:
                raise ValueError(f"duplicate request_id {req.request_id!r}")
            if not self.alive:
                raise StreamClosed("engine is not running")
            stream = TokenStream(self, req)
            self.streams[req.request_id] = stream
            self._pending_new += 1

        def apply():
            self._applied += 1     # it leaves the pending count when the loop next publishes
            try:
                add()
            except Exception as e:  # duplicate or full after all: the caller's stream says so
                self._close(req.request_id, e)
        self.inbox.put(apply)
        self.wake.set()
        return stream

    def submit(self, req: Request) -> TokenStream:
        """A new query to prefill and decode here. Raises QueueFull at once when the queue is full."""
        return self._enqueue_new(req, lambda: self.engine.add_request(req))

    def submit_prefilled(self, req: Request, pre: PrefillOutput) -> TokenStream:
        """A query prefilled elsewhere; its K/V joins the batch at the next step."""
        return self._enqueue_new(req, lambda: self.engine.add_prefilled(req, pre))

    def abort(self, request_id: str) -> None:
        """Frees the request's row or queue slot before the next step."""
        def apply():
            self.engine.abort(request_id)
            self._close(request_id, StreamClosed("cancelled"))
        self.inbox.put(apply)
        self.wake.set()

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn (cheap, non-blocking) on the loop thread whenever streams got events: after each
        step, and when a stream is closed. Returns the function that stops it."""
        with self._lock:
            self._listeners = [*self._listeners, fn]

        def stop():
            with self._lock:
                self._listeners = [f for f in self._listeners if f is not fn]
        return stop

    def _tell(self) -> None:
        for fn in self._listeners:
            fn()

    def call(self, fn: Callable[[Engine], object], timeout: float | None = 10.0) -> object:
        """Run fn(engine) on the loop thread between two steps and return its result."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        self.inbox.put(lambda: box.put(_capture(fn, self.engine)))
        self.wake.set()
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # ---- the loop thread -------------------------------------------------------------------
    def _close(self, request_id: str, err: Exception) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.events.put(err)
            self._tell()

    def _drain_inbox(self) -> None:
        while True:
            try:
                self.inbox.get_nowait()()
            except queue.Empty:
                return

    def _publish(self) -> None:
        """What other threads read of the engine, as of now (loop thread)."""
        waiting, self.stats, self._has_work = self.engine.num_waiting, self.engine.stats(), self.engine.has_work()
        with self._lock:
            self._waiting = waiting
            self._pending_new -= self._applied
            self._applied = 0

    def _run(self) -> None:
        try:
            if self._make is not None:
                self.engine = self._make()
                self.info = EngineInfo.of(self.engine)
            self.ready.set()
            while not self.stopped.is_set():
                self.last_beat = time.monotonic()
                self._drain_inbox()
                self._publish()
                if not self._has_work:
                    self.wake.wait(self.idle_wait_s)
                    self.wake.clear()
                    continue
                for ev in self.engine.step():
                    stream = self.streams.get(ev.request_id)
                    if stream is not None:
                        stream.events.put(ev)
                        if ev.finish_reason is not None:
                            del self.streams[ev.request_id]
                self._publish()     # the queue shrank as requests joined the batch
                self._tell()
        except BaseException as e:  # the engine broke: fail every stream, never leave one hanging
            log.exception("engine loop failed")
            self.error = e
        finally:
            self.ready.set()
            err = StreamClosed(f"engine stopped: {self.error!r}" if self.error else "engine stopped")
            for rid in list(self.streams):
                self._close(rid, err)


def _capture(fn, arg):
    try:
        return True, fn(arg)
    except Exception as e:
        return False, e
