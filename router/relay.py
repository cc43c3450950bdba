"""How a request's tokens reach its client's call (`messages`, for router/request_run.py).

Messages are paced: the router sends about RELAY_MSGS_PER_S token messages a second over all the
requests it relays, however many; after a message a request waits its share (requests / that, at most
MAX_PACE_S) and its next message carries every token that came meanwhile. One request alone gets each
step's tokens at once; 256 get a message every 0.25 s. Each message costs the router and the gateway a
fixed CPU price whatever it holds, so the path's cost per token falls as load rises.

`PushedRelay` relays for the gateway in the router's process (router/local_call.py): the link's reader
thread builds each message and pushes it to the gateway as the step comes in (Subscription.stream_to),
so nothing wakes the request's own thread per step (on 2 cores each wake-up of a thread preempts the
engine's: docs/benchmarks.md); tokens that come within the request's pace go out with the next step's.
The request's thread waits for the last message, which it sends itself (completion is counted as for a
gRPC call), or the stream's end.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Generator

from router.follow_link import Tokens

RELAY_MSGS_PER_S = 1000.0
MAX_PACE_S = 0.25


def pace_s(following: int) -> float:
    """How long a request waits after a message while the router relays `following` requests."""
    return min(MAX_PACE_S, following / RELAY_MSGS_PER_S)


def messages(attach, push, respond: Callable[[Tokens], object], pace: Callable[[], float],
             check: Callable[[], None]) -> Generator[object, None, object]:
    """A request's messages for the chunks of `attach` (its Subscription), up to the last, which is
    returned rather than yielded (None: the stream ended without one). With `push` (the in-process
    gateway's call) they go out from the link's reader thread (PushedRelay) and none is yielded; else
    they are yielded here, paced. The stream's end raises."""
    if push is not None:
        relay = PushedRelay(respond, push, pace)
        attach.stream_to(relay.on_chunk)
        return relay.last(check)
    for chunk in attach:   # the tokens of one or more steps
        resp = respond(chunk)
        if chunk.finish_reason:
            return resp
        yield resp
        time.sleep(pace())   # a cancel meanwhile settles at once (the RPC's callback)
    return None


class PushedRelay:
    """One request's chunks, from whichever thread delivers them, to `push`."""

    def __init__(self, respond: Callable[[Tokens], object], push: Callable[[object], None],
                 pace: Callable[[], float]):
        """respond(Tokens): the client's message for them (the request's books kept); push(message): send
        one; pace(): the request's pace now."""
        self.respond, self.push, self.pace = respond, push, pace
        self._lock, self._ended = threading.Lock(), threading.Event()
        self._held: list[Tokens] = []      # chunks not sent yet
        self._due = 0.0                    # when the next message may go
        self._outcome: object = None       # the last message, or the error that ended the stream

    def on_chunk(self, item) -> None:
        """Tokens or the stream's ending error (the link's reader thread, or the thread that fails it)."""
        with self._lock:
            if self._ended.is_set():
                return
            try:
                if isinstance(item, Exception):
                    if self._held:      # what came before the end still goes out
                        self.push(self.respond(_joined(self._held)))
                    raise item
                self._held.append(item)
                if not item.finish_reason:
                    now = time.monotonic()
                    if now >= self._due:
                        self.push(self.respond(_joined(self._held)))
                        self._held.clear()
                        self._due = now + self.pace()
                    return
                self._outcome = self.respond(_joined(self._held))
            except Exception as e:  # noqa: BLE001 - the stream's end, or a bug: raised on the request's thread
                self._outcome = e
            self._ended.set()

    def last(self, check: Callable[[], None], poll_s: float = 1.0):
        """Wait for the last message (returned) or the stream's end (raised), calling check() every
        poll_s meanwhile (it raises to give up: a cancel or a deadline ends the stream first anyway)."""
        try:
            while not self._ended.wait(poll_s):
                check()
        finally:
            with self._lock:            # no chunk is half-handled past here, and none is handled after
                self._ended.set()
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome


def _joined(chunks: list[Tokens]) -> Tokens:
    """Consecutive chunks of one request as one."""
    return functools.reduce(Tokens.merge, chunks[1:], chunks[0])
