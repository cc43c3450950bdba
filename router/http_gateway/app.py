"""The HTTP API's routes over one Gateway, and the limit on request bodies. A generation is:
check the body (schemas), build the GenerateRequest, call the router, answer with one JSON
response or an SSE stream (streaming). Every failure is an APIError, answered in one place."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
import uuid

import grpc
import grpc.aio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from baton.v1 import router_pb2
from router import metrics, metrics_scrape
from router.http_gateway import docs_ui, tools
from router.http_gateway import responses as R
from router.http_gateway.choices import Calls, choice_requests
from router.http_gateway.config import HttpLimits
from router.http_gateway.errors import APIError, rpc_error
from router.http_gateway.gateway import Gateway
from router.http_gateway.logprobs import TokenText
from router.http_gateway.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateBody,
                                        TokenizeRequest, check_sampling, parse_request)
from router.http_gateway.streaming import (CancellingStream, ClientGone, collect, full_response, sse_events,
                                           unless_disconnected)

try:
    VERSION = importlib.metadata.version("baton")
except importlib.metadata.PackageNotFoundError:   # a checkout that is not installed
    VERSION = "unknown"
BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}   # path -> its request body
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}   # path -> metrics label


def count(endpoint: str, status: int) -> None:
    metrics.count_http(endpoint, status)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                    code="body_too_large")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 - from its Content-Length before a byte of
    it is read, or as soon as a chunked body passes the limit - and a body that has not arrived
    `timeout_s` after the request's head gets 408. Either way the connection is then closed."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")   # h11 has checked it is a number
        if length is not None and int(length) > self.max_bytes:
            count(ENDPOINTS.get(scope["path"], "other"), 413)
            return await _too_large(self.max_bytes).response()(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, received, done = loop.time() + self.timeout_s, 0, False

        async def limited_receive():
            nonlocal received, done
            if done:   # the body is in: what follows is the disconnect
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                               code="timeout") from None
            if msg["type"] != "http.request":
                done = True
            else:
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _too_large(self.max_bytes)
                done = not msg.get("more_body", False)
            return msg

        await self.app(scope, limited_receive, send)


class ServedBy:
    """ASGI middleware of `baton up --api-servers N`'s API servers: every response says which one answered
    (`X-Baton-Api-Server: K`), so that a client can see the load spread over them."""

    def __init__(self, app, index: str):
        self.app, self.header = app, (b"x-baton-api-server", index.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), self.header]}
            await send(msg)
        await self.app(scope, receive, send_with_header)


def _generate_request(gw: Gateway, body: GenerateBody, rid: str, fields: dict, max_tokens: int | None, chat: bool):
    sampling = body.sampling_fields(max_tokens)
    check_sampling(sampling, chat, body.constraint_param)
    req = router_pb2.GenerateRequest(request_id=rid, **fields, **sampling)
    size = req.ByteSize()
    if size > gw.max_message_bytes:   # gRPC would refuse to send it, as RESOURCE_EXHAUSTED (a 429)
        raise APIError(413, f"the request is too large: {size} bytes once encoded for the router, which takes at "
                       f"most {gw.max_message_bytes}", param="messages" if chat else "prompt",
                       code="request_too_large")
    return req


def create_app(gw: Gateway, limits: HttpLimits = HttpLimits()) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.open()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="baton", description="OpenAI-compatible API of a baton deployment", version=VERSION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)   # /docs: docs_ui, from local files
    app.openapi = _openapi(app)
    app.state.gateway = gw
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if metrics.api_server_index() is not None:
        app.add_middleware(ServedBy, index=metrics.api_server_index())

    def _check_auth(request: Request) -> None:
        if not gw.authorized(request):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <token>'",
                           code="invalid_api_key")

    async def _generate(request: Request, endpoint: str, chat: bool):
        try:
            _check_auth(request)
            body = parse_request(await request.body(), ChatCompletionRequest if chat else CompletionRequest)
            model_id = await gw.served_model(body.model)
            rid = uuid.uuid4().hex
            if chat:
                prompts = [await gw.chat_prompt(body.messages, tools.definitions(body.tools, body.tool_choice))]
                max_tokens = body.max_completion_tokens or body.max_tokens
            else:   # a batch of prompts: each an independent request (id <rid>-<k>), n choices each
                prompts = [{"prompt": p, "raw": True} if isinstance(p, str) else {"prompt_token_ids": p}
                           for p in body.prompts()]
                max_tokens = body.max_tokens or 16   # OpenAI's default for completions
            reqs = [_generate_request(gw, body, rid if len(prompts) == 1 else f"{rid}-{k}", fields, max_tokens, chat)
                    for k, fields in enumerate(prompts)]
            token_text = TokenText(await gw.tokenizer() if body.num_logprobs is not None else None)
            # choice index = prompt index * n + j, as OpenAI's
            calls = Calls([gw.stub.Generate(r, timeout=gw.request_timeout_s, metadata=gw.metadata)
                           for req in reqs for r in choice_requests(req, body.n)])
            try:
                firsts = await unless_disconnected(request, calls, calls.first_messages())
            except grpc.RpcError as e:
                raise rpc_error(e, chat) from None
            if any(m is grpc.aio.EOF for m in firsts):
                calls.cancel()
                raise APIError(502, "the router ended the stream without a token", "server_error")
            streams = list(zip(calls.calls, firsts))
            meta = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()), "model": model_id}
            if body.stream:
                count(endpoint, 200)
                return CancellingStream(sse_events(streams, body, meta, chat, token_text), calls,
                                        headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})
            try:
                result = await unless_disconnected(request, calls, asyncio.gather(*(collect(*s) for s in streams)))
            except grpc.RpcError as e:
                calls.cancel()
                raise rpc_error(e, chat) from None
            count(endpoint, 200)
            return JSONResponse(full_response(list(result), body, meta, chat, token_text), headers={"X-Request-Id": rid})
        except APIError as e:
            count(endpoint, e.status)
            return e.response()
        except ClientGone:
            count(endpoint, 499)
            return Response(status_code=499)

    generation_errors = (400, 401, 404, 413, 429, 503, 504)

    @app.post("/v1/chat/completions", responses=R.documented(R.ChatCompletionResponse, *generation_errors))
    async def chat_completions(request: Request):
        """A chat completion; with `stream: true`, server-sent `chat.completion.chunk` events, then `[DONE]`."""
        return await _generate(request, "chat", chat=True)

    @app.post("/v1/completions", responses=R.documented(R.CompletionResponse, *generation_errors))
    async def completions(request: Request):
        """A text completion of one prompt or a batch; with `stream: true`, server-sent `text_completion`
        events, then `[DONE]`."""
        return await _generate(request, "completions", chat=False)

    @app.get("/v1/models", responses=R.documented(R.ModelList, 401))
    async def models(request: Request):
        _check_auth(request)
        return {"object": "list", "data": [await gw.model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=R.documented(R.ModelCard, 401, 404))
    async def model(model_id: str, request: Request):
        _check_auth(request)
        await gw.served_model(model_id)
        return await gw.model_card()

    @app.post("/tokenize", responses=R.documented(R.TokenizeResponse, 400, 401, 404, 501))
    async def tokenize(request: Request):
        _check_auth(request)
        body = parse_request(await request.body(), TokenizeRequest)
        await gw.served_model(body.model)
        ids = await gw.tokenize(body)
        return {"count": len(ids), "max_model_len": gw.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", responses=R.documented(R.DetokenizeResponse, 400, 401, 404, 501))
    async def detokenize(request: Request):
        _check_auth(request)
        body = parse_request(await request.body(), DetokenizeRequest)
        await gw.served_model(body.model)
        return {"prompt": await gw.detokenize(body.tokens)}

    @app.get("/version", responses=R.documented(R.VersionResponse))
    async def version():
        return {"version": VERSION}

    @app.get("/health", responses={**R.documented(R.HealthResponse), 503: {"model": R.HealthResponse}})
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

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus():
        body = await asyncio.to_thread(metrics_scrape.exposition, gw.status_collector)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    docs_ui.add_routes(app)

    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    async def _not_found(request: Request, exc):
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    async def _method(request: Request, exc):
        return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _method)
    return app


def _openapi(app: FastAPI):
    """FastAPI's OpenAPI document with the request bodies added: the routes read their bodies themselves
    (the raw checks of schemas.parse_body come before pydantic), so FastAPI cannot see the models."""
    def document() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, model in BODIES.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
                doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = doc
        return app.openapi_schema
    return document
