"""A generation's answer: collected into one OpenAI response, or relayed as server-sent events,
with the gRPC call cancelled whenever the client goes away (the router then frees the request's
batch slot)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from fastapi import Request
from fastapi.responses import StreamingResponse

from baton.wire import FINISH_NAMES
from router import metrics
from router.http_gateway import tools
from router.http_gateway.choices import ended, merge, stream_ended
from router.http_gateway.errors import APIError, rpc_error
from router.http_gateway.logprobs import CompletionLogprobs, TokenText, chat_content, choice_logprobs
from router.http_gateway.schemas import GenerateBody


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



def usage(lasts, n: int) -> dict:
    """OpenAI's usage over the choices' last messages, in choice order (n per prompt): each prompt
    counted once, the completions summed."""
    p = sum(int(m.usage.prompt_tokens) for m in lasts[::n])
    return _usage(p, sum(int(m.usage.completion_tokens) for m in lasts))


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Choice:
    """One choice's whole answer."""
    text: str
    ids: list[int]
    logprobs: list          # TokenLogprobs, one per id (empty unless asked for)
    last: Any               # its last GenerateResponse: finish reason and usage


async def collect(call, first) -> Choice:
    text, ids, lps, last = [first.text], list(first.token_ids), list(first.logprobs), first
    while not last.finish_reason:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise stream_ended()
        text.append(msg.text)
        ids.extend(msg.token_ids)
        lps.extend(msg.logprobs)
        last = msg
    await ended(call)
    metrics.observe_request(last, source="gateway")
    return Choice("".join(text), ids, lps, last)


def full_response(choices: list[Choice], body: GenerateBody, meta: dict, chat: bool, token_text: TokenText) -> dict:
    out, parse_calls = [], tools.calling(body)
    for i, c in enumerate(choices):
        choice: dict[str, Any] = {"index": i, "finish_reason": FINISH_NAMES.get(c.last.finish_reason, "stop"),
                                  "logprobs": choice_logprobs(c.ids, c.logprobs, token_text, chat)}
        if chat:
            content, calls = tools.parse(c.text) if parse_calls else (c.text, [])
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"], choice["finish_reason"] = calls, "tool_calls"
        else:
            choice["text"] = c.text
        if body.return_token_ids:
            choice["token_ids"] = c.ids
        out.append(choice)
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": out,
            "usage": usage([c.last for c in choices], body.n)}


async def sse_events(streams: list, body: GenerateBody, meta: dict, chat: bool, token_text: TokenText):
    """The SSE body: per choice (its `index`), one chunk per router message and its finish chunk; then
    the usage chunk (if asked for) and [DONE]. With continuous usage (vLLM's) every chunk carries its
    choice's usage so far: its prompt (the router's first message says it) and its tokens out. An
    error after the first token becomes a last `data: {"error": ...}` event. `streams`: (call, first
    message) per choice."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    completion_lps = [CompletionLogprobs(token_text) for _ in streams]
    prompt_tokens = [int(first.usage.prompt_tokens) for _, first in streams]
    tokens_out = [0] * len(streams)

    def chunk(i: int, text: str | None, ids=None, finish=None, role=False, lps=None, calls=None) -> bytes:
        c: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": lps}
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = tools.call_deltas(calls)
            c["delta"] = delta
        else:
            c["text"] = text or ""
        if body.return_token_ids and ids is not None:
            c["token_ids"] = list(ids)
        out = {**meta, "object": obj, "choices": [c]}
        if body.include_usage:
            out["usage"] = _usage(prompt_tokens[i], tokens_out[i]) if body.continuous_usage else None
        return sse(out)

    def logprobs(i: int, msg):
        if not msg.logprobs:
            return None
        if chat:
            return {"content": chat_content(msg.token_ids, msg.logprobs, token_text)}
        return completion_lps[i].add(msg.token_ids, msg.logprobs)

    if chat:
        for i in range(len(streams)):
            yield chunk(i, "", role=True)
    lasts, filters = {}, [tools.CallFilter() for _ in streams] if chat and tools.calling(body) else None
    try:
        async for i, msg in merge(streams):
            tokens_out[i] += len(msg.token_ids)
            lps = logprobs(i, msg)
            text = filters[i].feed(msg.text) if filters else msg.text   # held back where a tool call may begin
            if text or (body.return_token_ids and msg.token_ids) or lps:
                yield chunk(i, text, msg.token_ids, lps=lps)
            if msg.finish_reason:
                metrics.observe_request(msg, source="gateway")
                lasts[i] = msg
                rest, calls = filters[i].finish() if filters else ("", [])
                if rest or calls:
                    yield chunk(i, rest or None, calls=calls)
                yield chunk(i, None if chat else "", [] if body.return_token_ids else None,
                            finish="tool_calls" if calls else FINISH_NAMES.get(msg.finish_reason, "stop"))
        if body.include_usage:
            yield sse({**meta, "object": obj, "choices": [], "usage": usage([lasts[i] for i in sorted(lasts)], body.n)})
    except grpc.RpcError as e:
        yield sse(rpc_error(e, chat).body())
    except APIError as err:
        yield sse(err.body())
    yield b"data: [DONE]\n\n"
