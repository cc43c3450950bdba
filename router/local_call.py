"""Router.Generate for the HTTP gateway that runs in the router's own process (`baton up` with one API
server): the gateway's call runs the servicer's handler on a thread of this module's pool and gets each
GenerateResponse through its event loop, as a grpc.aio call hands them over, without the loopback
HTTP/2 connection, protobuf (de)serialisation and the gRPC server's per-message machinery between two
halves of one process. Everything else the gateway asks the router (Status) still goes over gRPC.
Messages reach the loop through one Outbox per loop: whatever arrives while the loop is busy costs
it one wake-up, and a read takes the messages queued by then as one. The handler may also send from
other threads (`context.push`): the router's relay does, from the link's reader thread, so that a
step's messages wake no thread per request (router/request_run.py).

What the handler sees is a ServicerContext's behaviour: `add_callback` callbacks run once when the call
ends however it ends (completed, failed, cancelled by the client, past its deadline), `is_active` turns
False on a cancel or a deadline, `abort` raises. What the gateway sees is a grpc.aio call's: `read()`
gives messages then `grpc.aio.EOF` or raises a grpc.RpcError with `code()`, `details()` and
`trailing_metadata()`; `code()` awaits the end; `cancel()` ends it CANCELLED.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio

log = logging.getLogger(__name__)


class LocalRpcError(grpc.RpcError):
    """How a local call ended, read as a failed grpc.aio call's error."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def _cancelled() -> LocalRpcError:
    return LocalRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")   # grpc.aio's words


class LocalContext:
    """The handler's side of one local call. Beyond a ServicerContext it has `push(message)`: send a
    message from any thread, as a yield from the handler would (the router's relay pushes each step's
    message from the link's reader thread: router/request_run.py)."""

    def __init__(self, metadata: tuple, deadline: float | None, push=None):
        self.metadata, self.deadline, self.push = tuple(metadata or ()), deadline, push
        self.trailing: tuple = ()
        self._callbacks: list = []
        self._lock = threading.Lock()
        self._ended = False

    def add_callback(self, fn) -> bool:
        with self._lock:
            if not self._ended:
                self._callbacks.append(fn)
        return not self._ended

    def is_active(self) -> bool:
        return not self._ended and (self.deadline is None or time.monotonic() < self.deadline)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def peer(self) -> str:
        return "local"

    def abort(self, code: grpc.StatusCode, details: str):
        raise LocalRpcError(code, details, self.trailing)

    def why_ended(self) -> LocalRpcError:
        """The error of a call that is no longer active: past its deadline, or cancelled."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return _cancelled()

    def end(self) -> None:
        """The call is over: the callbacks run, once."""
        with self._lock:
            if self._ended:
                return
            self._ended, callbacks = True, self._callbacks
        for fn in callbacks:
            try:
                fn()
            except Exception:   # noqa: BLE001 - as gRPC does: one callback's failure stops no other
                log.exception("a local call's callback failed")


class Outbox:
    """Hands items from other threads to one event loop, one wake-up of the loop for all that came
    meanwhile (a step's messages for every request arrive together)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list = []            # (function, item) to call on the loop, in order
        self._lock = threading.Lock()

    def put(self, fn, item) -> None:
        with self._lock:
            self._items.append((fn, item))
            if len(self._items) > 1:
                return                    # a wake-up is on its way
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:   # the loop is closed: nobody reads any more
            with self._lock:
                self._items.clear()

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for fn, item in items:
            fn(item)


class LocalCall:
    """The gateway's side of one local call (made and read on its event loop)."""

    def __init__(self, handler, request, metadata, timeout: float | None, pool: ThreadPoolExecutor, outbox: Outbox):
        self._loop = asyncio.get_running_loop()
        self._outbox = outbox
        self._items: collections.deque = collections.deque()   # messages, then EOF or a LocalRpcError
        self._ready = asyncio.Event()
        self._end: asyncio.Future = self._loop.create_future()
        self._final: object = None                      # EOF or the error, once read
        deadline = None if timeout is None else time.monotonic() + timeout
        self.context = LocalContext(metadata, deadline, push=self._put)
        self._timer = None if timeout is None else self._loop.call_later(timeout, self._expire)
        pool.submit(self._run, handler, request)

    # -- the handler's thread
    def _run(self, handler, request) -> None:
        ctx = self.context
        result: object = grpc.aio.EOF
        try:
            with contextlib.closing(handler(request, ctx)) as responses:
                for resp in responses:
                    if not ctx.is_active():   # cancelled or expired: the handler's finally blocks run now
                        break
                    self._put(resp)
        except LocalRpcError as e:
            result = e
        except Exception as e:  # noqa: BLE001 - the rpc decorator turns handler errors into aborts; this is a bug
            log.exception("local Generate failed")
            result = LocalRpcError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            if result is grpc.aio.EOF and not ctx.is_active():   # it stopped for the deadline or a cancel, not
                result = ctx.why_ended()                          # at its end (the handler saw it first)
            ctx.end()
            self._put(result)

    def _put(self, item) -> None:
        self._outbox.put(self._deliver, item)

    # -- the loop's side
    def _deliver(self, item) -> None:
        if self._end.done():
            return          # ended by cancel() or the deadline: later messages are nobody's
        if item is grpc.aio.EOF or isinstance(item, LocalRpcError):
            self._finish(item)
        else:
            self._queue(item)

    def _queue(self, item) -> None:
        self._items.append(item)
        self._ready.set()

    def _finish(self, item) -> None:
        if not self._end.done():
            self._end.set_result(item)
            self._queue(item)
            if self._timer is not None:
                self._timer.cancel()

    def _expire(self) -> None:
        self._finish(self.context.why_ended())
        self.context.end()   # the router's callback frees the request's row (its worker calls run in the background)

    def cancel(self) -> bool:
        if self._end.done():
            return False
        self._finish(_cancelled())
        self.context.end()
        return True

    async def read(self):
        """The next message, merged with the ones queued behind it (a reader slower than the steps gets
        fewer, larger messages), then EOF, or the error the call ended with."""
        if self._final is None:
            while not self._items:
                self._ready.clear()
                await self._ready.wait()
            item = self._items.popleft()
            if _is_message(item):
                while not item.finish_reason and self._items and _is_message(self._items[0]):
                    item = _merged(item, self._items.popleft())
                return item
            self._final = item
        if isinstance(self._final, LocalRpcError):
            raise self._final
        return grpc.aio.EOF

    async def code(self) -> grpc.StatusCode:
        end = await asyncio.shield(self._end)
        return grpc.StatusCode.OK if end is grpc.aio.EOF else end.code()


def _is_message(item) -> bool:
    return item is not grpc.aio.EOF and not isinstance(item, LocalRpcError)


def _merged(msg, more):
    """Two consecutive GenerateResponses as one: texts joined, token ids and logprobs in order, the
    later one's finish, usage and timings."""
    text = msg.text + more.text
    msg.MergeFrom(more)
    msg.text = text
    return msg


class LocalRouterStub:
    """The router stub the in-process gateway uses: Generate runs here, anything else goes to `remote`."""

    def __init__(self, servicer, remote, max_streams: int):
        self._servicer, self._remote = servicer, remote
        self._pool = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="router-local")
        self._outbox: Outbox | None = None
        self._lock = threading.Lock()
        self.running = 0            # handlers not yet returned (a relay that outlives its call is a leak)

    def Generate(self, request, timeout: float | None = None, metadata=None) -> LocalCall:  # noqa: N802 - the stub's name
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        return LocalCall(self._counted, request, metadata, timeout, self._pool, self._outbox)

    def _counted(self, request, context):
        with self._lock:
            self.running += 1
        try:
            yield from self._servicer.Generate(request, context)
        finally:
            with self._lock:
                self.running -= 1

    def __getattr__(self, name: str):
        return getattr(self._remote, name)
