"""`n` choices per request: n independent router requests, one per choice.

Choice i is its own GenerateRequest (request id `<id>-<i>`, seed + i when the request gives a
seed, else the router's own random seed for each), so choices are independent samples and each
is as reproducible as a single request. The prompt's prefill is not shared between them: each
choice is prefilled on its own (n prefills of the same prompt); the answer counts the prompt once
in `usage`, as OpenAI does. Their messages are merged as they come (streaming) or gathered."""
from __future__ import annotations

import asyncio
import contextlib

import grpc.aio

from baton.v1 import router_pb2
from router.http_gateway.errors import APIError

U64 = 2 ** 64
END_WAIT_S = 5.0   # how long the router may take to end a call after its last message


def choice_requests(req: router_pb2.GenerateRequest, n: int) -> list[router_pb2.GenerateRequest]:
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        r = router_pb2.GenerateRequest()
        r.CopyFrom(req)
        r.request_id = f"{req.request_id}-{i}"
        if req.HasField("seed"):
            r.seed = (req.seed + i) % U64
        out.append(r)
    return out


class Calls:
    """The choices' gRPC calls, cancelled together (what CancellingStream and unless_disconnected cancel)."""

    def __init__(self, calls: list):
        self.calls = calls

    def cancel(self) -> None:
        for c in self.calls:
            c.cancel()

    async def first_messages(self) -> list:
        """Each call's first message; any failure cancels them all."""
        try:
            return list(await asyncio.gather(*(c.read() for c in self.calls)))
        except BaseException:
            self.cancel()
            raise


async def ended(call) -> None:
    """Let the router end a call whose last message arrived, rather than cancel it first: the router
    counts a request completed once the call ends after its last message, cancelled if the call is
    cancelled before (it cannot tell a client that got everything from one that went away)."""
    with contextlib.suppress(asyncio.TimeoutError, grpc.RpcError):
        await asyncio.wait_for(call.code(), END_WAIT_S)


def stream_ended() -> APIError:
    """The router closed a stream before its last message."""
    return APIError(502, "the router ended the stream before the finish", "server_error")


async def merge(streams: list):
    """(choice index, message) from every (call, first message) of `streams`, in arrival order,
    until each choice's last message; the first failure is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, call, msg) -> None:
        try:
            while True:
                await queue.put((i, msg, None))
                if msg.finish_reason:
                    return await ended(call)
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    raise stream_ended()
        except Exception as e:  # the consumer re-raises it
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, call, first)) for i, (call, first) in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, msg, err = await queue.get()
            if err is not None:
                raise err
            yield i, msg
            left -= bool(msg.finish_reason)
        await asyncio.gather(*tasks)   # every call ended by the router (bounded by END_WAIT_S)
    finally:
        for t in tasks:
            t.cancel()
