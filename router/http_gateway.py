"""An OpenAI-compatible HTTP API in front of the baton router (which it calls over gRPC).

    python -m router.http_gateway --router 127.0.0.1:50051 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming over SSE with
`"stream": true`), GET /v1/models, GET /health (200 when the router is SERVING, else 503),
GET /metrics (Prometheus text). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400 (bad input), 401 (missing or wrong
bearer token when the gateway has one), 429 (router queue full), 503 (no live worker / router
unreachable). See docs/http.md.

The gateway holds no model: the router validates, tokenizes and detokenizes. For chat, the
gateway renders the chat template itself (with the model's tokenizer, loaded from the path
the router reports, when it can) so multi-turn conversations are exact; a model without a
template gets a plain "role: content" transcript ending in "assistant:", sent raw.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from baton import grpc_util
from baton.v1 import router_pb2, router_pb2_grpc
from router import metrics

log = logging.getLogger(__name__)

FINISH = {1: "length", 2: "stop"}
U64_MAX = 2**64 - 1
# gRPC status -> (HTTP status, OpenAI error type)
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNAUTHENTICATED: (502, "server_error"),   # the gateway's own token was refused
    grpc.StatusCode.PERMISSION_DENIED: (502, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
# Router error messages name its fields; the HTTP API names some of them differently.
PARAM_OF = (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
            ("top_k", "top_k"), ("stop", "stop"), ("seed", "seed"), ("request_id", "request_id"),
            ("prompt_token_ids", "prompt"), ("prompt", "prompt"), ("no tokenizer", "prompt"))


# ---- request bodies ----------------------------------------------------------------------------
class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Unknown fields are ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=U64_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # baton extensions (send with the openai client's extra_body=...)
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"n must be 1 (one choice per request is supported), got {v}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v, info):
        if v not in (None, 0, 0.0):
            raise ValueError(f"{info.field_name} is not supported (must be 0 or absent)")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, got type {self.type!r}")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        if v:
            raise ValueError("top_logprobs is not supported")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError(f"one prompt per request is supported, got {len(v)}")
                v = v[0]
                if isinstance(v, list) and not v:
                    raise ValueError("prompt must not be empty")
            if isinstance(v, list) and any(t < 0 or t > 2**32 - 1 for t in v):
                raise ValueError("prompt token ids must be in [0, 2^32)")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError(f"best_of must be 1, got {v}")
        return v


# ---- errors ----------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",):
            out += ("." if out else "") + str(part)
    return out


def validation_error(e: ValidationError) -> APIError:
    msgs, first = [], None
    for err in e.errors():
        # For union types pydantic adds the member type to the location ("stop.str"): drop it.
        loc = [p for p in err["loc"] if p not in ("str", "list[str]", "list[int]", "list[list[int]]",
                                                  "list[ContentPart]", "int", "float")]
        field = _loc(loc) or None
        first = first or field
        msg = err["msg"].removeprefix("Value error, ")
        msgs.append(f"{field}: {msg}" if field else msg)
    uniq = list(dict.fromkeys(msgs))
    return APIError(400, "; ".join(uniq[:5]), param=first.split(".")[0].split("[")[0] if first else None,
                    code="invalid_value")


def rpc_error(e: grpc.aio.AioRpcError | grpc.RpcError, chat: bool = False) -> APIError:
    code = e.code()
    status, type_ = HTTP_OF.get(code, (500, "server_error"))
    details = e.details() or code.name
    param = None
    if status == 400:
        for needle, name in PARAM_OF:
            if needle in details:
                param = name
                break
        details = details.replace("max_new_tokens", "max_tokens")
        if chat and param == "prompt":
            param = "messages"
    return APIError(status, details, type_, param, code.name.lower())


# ---- the gateway -------------------------------------------------------------------------------
class Gateway:
    """State shared by the handlers: the router channel (created in the server's event loop)."""

    def __init__(self, router_address: str, auth_token: str | None = None, router_auth_token: str | None = None,
                 model_name: str | None = None, tls_root_cert: str | None = None, request_timeout_s: float | None = None):
        self.router_address, self.auth_token = router_address, auth_token
        self.metadata = grpc_util.auth_metadata(router_auth_token if router_auth_token is not None else auth_token)
        self.model_name, self.tls_root_cert, self.request_timeout_s = model_name, tls_root_cert, request_timeout_s
        self.expected_auth = f"Bearer {auth_token}".encode() if auth_token else None
        self.channel: grpc.aio.Channel | None = None
        self.stub: router_pb2_grpc.RouterStub | None = None
        self.created = int(time.time())
        self._router_model: str | None = None
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self._tokenizer_lock = threading.Lock()
        # /metrics reads the router's Status over a plain (blocking) channel in a worker thread.
        self._sync_channel = grpc_util.make_channel(router_address, tls_root_cert=tls_root_cert)
        sync_stub = router_pb2_grpc.RouterStub(self._sync_channel)
        self.status_collector = metrics.RouterStatusCollector(
            lambda: sync_stub.Status(router_pb2.StatusRequest(), timeout=3, metadata=self.metadata))

    # -- lifecycle (inside the server's loop)
    async def open(self) -> None:
        opts = [("grpc.max_receive_message_length", grpc_util.MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", grpc_util.MAX_MESSAGE_BYTES)]
        if self.tls_root_cert:
            with open(self.tls_root_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
            self.channel = grpc.aio.secure_channel(self.router_address, creds, options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(self.router_address, options=opts)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)
        self._sync_channel.close()

    # -- helpers
    def authorized(self, request: Request) -> bool:
        if self.expected_auth is None:
            return True
        got = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(got, self.expected_auth)

    async def router_model(self) -> str | None:
        """The model the router serves (its --model: a name or a directory), asked once."""
        if self._router_model is None:
            try:
                st = await self.stub.Status(router_pb2.StatusRequest(), timeout=5, metadata=self.metadata)
                self._router_model = st.model
            except grpc.RpcError as e:
                log.debug("router Status failed: %s", e)
        return self._router_model

    async def model_id(self) -> str:
        if self.model_name:
            return self.model_name
        m = await self.router_model()
        if not m:
            return "baton"
        return Path(m).name if ("/" in m or os.sep in m) else m

    def _load_tokenizer(self, model: str):
        with self._tokenizer_lock:
            if not self._tokenizer_tried:
                self._tokenizer_tried = True
                try:
                    from router.main import load_tokenizer
                    self._tokenizer = load_tokenizer(model)[0]
                except Exception as e:  # another machine's path, or no tokenizer: plain prompts then
                    log.info("no local tokenizer for %s (%s): chat prompts are built without a template", model, e)
            return self._tokenizer

    async def tokenizer(self):
        if self._tokenizer_tried:
            return self._tokenizer
        model = await self.router_model()
        if model is None:
            return None  # the router did not answer; try again next time
        return await asyncio.to_thread(self._load_tokenizer, model)

    async def chat_prompt(self, messages: list[ChatMessage]) -> dict:
        """GenerateRequest fields for a conversation."""
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        tok = await self.tokenizer()
        if tok is not None and getattr(tok, "chat_template", None):
            return {"prompt_token_ids": render_chat_template(tok, msgs)}
        if tok is None and len(msgs) == 1 and msgs[0]["role"] == "user":
            # No tokenizer here: the router applies the model's chat template (if any) to one user turn.
            return {"prompt": msgs[0]["content"], "raw": False}
        return {"prompt": plain_chat_prompt(msgs), "raw": True}


def render_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def plain_chat_prompt(messages: list[dict]) -> str:
    """A transcript for models without a chat template: one "role: content" line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _sampling_fields(body: _Common, max_tokens: int | None, default_temperature: float = 1.0) -> dict:
    f = dict(max_new_tokens=max_tokens or 0,
             temperature=default_temperature if body.temperature is None else body.temperature,
             top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, stop=body.stops(),
             ignore_eos=body.ignore_eos)
    if body.seed is not None:
        f["seed"] = body.seed
    return f


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, call, aw):
    """Await `aw`; if the client goes away first, cancel the gRPC call and raise ClientGone."""
    task = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_wait_disconnect(request))
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


class _CancellingStream(StreamingResponse):
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


def create_app(gw: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.open()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="baton", description="OpenAI-compatible API of a baton deployment", lifespan=lifespan)
    app.state.gateway = gw

    def _count(endpoint: str, status: int) -> None:
        metrics.HTTP_REQUESTS.labels(endpoint, str(status)).inc()

    async def _parse(request: Request, model: type[BaseModel]):
        if not gw.authorized(request):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <token>'",
                           "invalid_request_error", None, "invalid_api_key")
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def _generate(request: Request, endpoint: str, chat: bool):
        try:
            body = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
            rid = uuid.uuid4().hex
            if chat:
                fields = await gw.chat_prompt(body.messages)
                max_tokens = body.max_completion_tokens or body.max_tokens
            else:
                p = body.prompt
                fields = {"prompt": p, "raw": True} if isinstance(p, str) else {"prompt_token_ids": p}
                max_tokens = body.max_tokens or 16   # OpenAI's default for completions
            fields.update(_sampling_fields(body, max_tokens))
            req = router_pb2.GenerateRequest(request_id=rid, **fields)
            model_id = body.model or await gw.model_id()
            call = gw.stub.Generate(req, timeout=gw.request_timeout_s, metadata=gw.metadata)
            try:
                first = await _unless_disconnected(request, call, call.read())
            except grpc.RpcError as e:
                raise rpc_error(e, chat) from None
            if first is grpc.aio.EOF:
                raise APIError(502, "the router ended the stream without a token", "server_error")
            prefix = "chatcmpl-" if chat else "cmpl-"
            meta = {"id": prefix + rid, "created": int(time.time()), "model": model_id}
            if body.stream:
                _count(endpoint, 200)
                return _CancellingStream(_stream(call, first, body, meta, chat), call,
                                         headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})
            try:
                result = await _unless_disconnected(request, call, _collect(call, first))
            except grpc.RpcError as e:
                raise rpc_error(e, chat) from None
            _count(endpoint, 200)
            return JSONResponse(_full_response(result, body, meta, chat), headers={"X-Request-Id": rid})
        except APIError as e:
            _count(endpoint, e.status)
            return e.response()
        except ClientGone:
            _count(endpoint, 499)
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, "chat", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completions", chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        if not gw.authorized(request):
            return APIError(401, "missing or wrong API key", code="invalid_api_key").response()
        return {"object": "list", "data": [_model_card(await gw.model_id(), gw.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if not gw.authorized(request):
            return APIError(401, "missing or wrong API key", code="invalid_api_key").response()
        served = await gw.model_id()
        if model_id != served:
            return APIError(404, f"model {model_id!r} does not exist; this server serves {served!r}",
                            param="model", code="model_not_found").response()
        return _model_card(served, gw.created)

    @app.get("/health")
    async def health():
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            r = await health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                   timeout=2)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            status = e.code().name
        ok = status == "SERVING"
        return JSONResponse({"status": "ok" if ok else "unavailable", "router": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        body = await asyncio.to_thread(metrics.exposition, gw.status_collector)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def _not_found(request: Request, exc):
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    async def _method(request: Request, exc):
        return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _method)
    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "baton"}


def _usage(last) -> dict:
    p, c = int(last.usage.prompt_tokens), int(last.usage.completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(call, first):
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


def _full_response(result, body: _Common, meta: dict, chat: bool) -> dict:
    text, ids, last = result
    choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(last.finish_reason, "stop"), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if body.return_token_ids:
        choice["token_ids"] = ids
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(last)}


async def _stream(call, first, body: _Common, meta: dict, chat: bool):
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
        return _sse(out)

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
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(msg)})
                break
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise APIError(502, "the router ended the stream before the finish", "server_error")
    except grpc.RpcError as e:
        err = rpc_error(e, chat)
        yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
    except APIError as err:
        yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
    yield b"data: [DONE]\n\n"


# ---- running it ----------------------------------------------------------------------------------
class GatewayHandle:
    def __init__(self, server, thread: threading.Thread, sock: socket.socket, app: FastAPI):
        self.server, self.thread, self.sock, self.app = server, thread, sock, app
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving: open streams get ~1 s, then are cut (their gRPC calls are cancelled)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(1.0)
        with contextlib.suppress(OSError):
            self.sock.close()


def start_gateway(router_address: str, host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None, *,
                  router_auth_token: str | None = None, model_name: str | None = None,
                  tls_root_cert: str | None = None, request_timeout_s: float | None = None,
                  log_level: str = "warning") -> GatewayHandle:
    """Serve the HTTP API on host:port (0 = a free port) in a background thread; returns a handle
    with .port, .url and .stop(). `auth_token` guards /v1/* (and is sent to the router unless
    `router_auth_token` is given)."""
    import uvicorn
    gw = Gateway(router_address, auth_token, router_auth_token, model_name, tls_root_cert, request_timeout_s)
    app = create_app(gw)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=1,
                            lifespan="on", loop="asyncio", http="h11", ws="none")
    server = uvicorn.Server(config)
    started = threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            failure.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=run, name=f"http-gateway-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and not started.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError(f"the HTTP gateway did not start: {failure[0] if failure else 'timeout'}")
    handle = GatewayHandle(server, thread, sock, app)
    log.info("HTTP gateway on %s -> router %s", handle.url, router_address)
    return handle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m router.http_gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", default="127.0.0.1:50051", help="the router's gRPC address host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = a free one)")
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="require 'Authorization: Bearer <token>' on /v1/*; also sent to the router")
    p.add_argument("--router-auth-token", default=None, help="the router's token, when it differs")
    p.add_argument("--model-name", default=None, help="the model id to report (default: the router's model)")
    p.add_argument("--tls-root-cert", help="CA certificate of a TLS router")
    p.add_argument("--request-timeout", type=float, default=None, help="deadline of each generation, seconds")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s http %(name)s: %(message)s")
    gateway = start_gateway(a.router, a.host, a.port, a.auth_token, router_auth_token=a.router_auth_token,
                            model_name=a.model_name, tls_root_cert=a.tls_root_cert,
                            request_timeout_s=a.request_timeout)
    print(f"BATON_READY role=http address={a.host}:{gateway.port} pid={os.getpid()}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
