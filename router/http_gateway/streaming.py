"""A generation's answer: collected into one OpenAI response, or relayed as server-sent events,
with the gRPC call cancelled whenever the client goes away (the router then frees the request's
batch slot)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import grpc.aio
from fastapi import Request
from fastapi.responses import StreamingResponse

from baton.v1 import router_pb2
from router import metrics
from router.http_gateway.errors import APIError, rpc_error
from router.http_gateway.schemas import GenerateBody

# The one finish-reason table: the proto's FinishReason names, as OpenAI spells them.
FINISH = {number: name.removeprefix("FINISH_REASON_").lower()
          for name, number in router_pb2.FinishReason.items() if number}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, call, aw):
    """Await `aw`; if the client goes away first, cancel the gRPC call and raise ClientGone."""
    task = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        call.cancel()
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task not in done:
        call.cancel()
        task.cancel()
        raise ClientGone()
    return task.result()


class ClientGone(Exception):
    pass


class CancellingStream(StreamingResponse):
    """An SSE response that cancels its gRPC call however the response ends (finished, client gone,
    server stopping): the router then frees the request's batch slot."""

    def __init__(self, content, call, headers=None):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.call = call

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.cancel()



def usage(last) -> dict:
    p, c = int(last.usage.prompt_tokens), int(last.usage.completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def collect(call, first):
    text, ids, last = [first.text], list(first.token_ids), first
    while not last.finish_reason:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise APIError(502, "the router ended the stream before the finish", "server_error")
        text.append(msg.text)
        ids.extend(msg.token_ids)
        last = msg
    metrics.observe_request(last, source="gateway")
    return "".join(text), ids, last


def full_response(result, body: GenerateBody, meta: dict, chat: bool) -> dict:
    text, ids, last = result
    choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(last.finish_reason, "stop"), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if body.return_token_ids:
        choice["token_ids"] = ids
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(last)}


async def sse_events(call, first, body: GenerateBody, meta: dict, chat: bool):
    """The SSE body: one chunk per router message, the finish (and usage) chunk, then [DONE]; an
    error after the first token becomes a last `data: {"error": ...}` event."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, ids=None, finish=None, role=False) -> bytes:
        c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text or ""
        if body.return_token_ids and ids is not None:
            c["token_ids"] = list(ids)
        out = {**meta, "object": obj, "choices": [c]}
        if body.include_usage:
            out["usage"] = None
        return sse(out)

    if chat:
        yield chunk("", role=True)
    msg = first
    try:
        while True:
            if msg.text or (body.return_token_ids and msg.token_ids):
                yield chunk(msg.text, msg.token_ids)
            if msg.finish_reason:
                metrics.observe_request(msg, source="gateway")
                yield chunk(None if chat else "", [] if body.return_token_ids else None,
                            finish=FINISH.get(msg.finish_reason, "stop"))
                if body.include_usage:
                    yield sse({**meta, "object": obj, "choices": [], "usage": usage(msg)})
                break
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise APIError(502, "the router ended the stream before the finish", "server_error")
    except grpc.RpcError as e:
        yield sse(rpc_error(e, chat).body())
    except APIError as err:
        yield sse(err.body())
    yield b"data: [DONE]\n\n"

