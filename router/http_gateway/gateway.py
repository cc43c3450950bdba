"""The gateway's state: the router channels, the model's name and tokenizer, and the chat prompt
built from a conversation. It holds no model: the router validates, tokenizes and detokenizes; the
gateway renders the chat template itself (with the model's tokenizer, loaded from the path the
router reports, when it can) so multi-turn conversations are exact; a model without a template
gets a plain "role: content" transcript ending in "assistant:", sent raw."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from fastapi import Request

from baton import grpc_util
from baton.v1 import router_pb2, router_pb2_grpc
from router import metrics, metrics_scrape
from router.http_gateway.errors import APIError
from router.http_gateway.schemas import ChatMessage, TokenizeRequest
from router.http_gateway.tools import template_message

log = logging.getLogger(__name__)


class Gateway:
    """State shared by the handlers: the router channel (created in the server's event loop)."""

    def __init__(self, router_address: str, auth_token: str | None = None, router_auth_token: str | None = None,
                 model_name: str | None = None, tls_root_cert: str | None = None, request_timeout_s: float | None = None,
                 max_message_bytes: int = grpc_util.MAX_MESSAGE_BYTES, local_router=None):
        """`local_router`: the router's servicer when it runs in this process (`baton up`): Generate
        calls it directly (router/local_call.py) instead of over gRPC."""
        self.router_address, self.auth_token = router_address, auth_token
        self.local_router = local_router
        self.max_message_bytes = max_message_bytes   # the largest GenerateRequest the router takes
        self.metadata = grpc_util.auth_metadata(router_auth_token if router_auth_token is not None else auth_token)
        self.model_name, self.tls_root_cert, self.request_timeout_s = model_name, tls_root_cert, request_timeout_s
        self.expected_auth = f"Bearer {auth_token}".encode() if auth_token else None
        self.channel: grpc.aio.Channel | None = None
        self.stub: router_pb2_grpc.RouterStub | None = None
        self.created = int(time.time())
        self._router_model: str | None = None
        self.max_model_len: int | None = None   # the model's context, read with its tokenizer
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self._tokenizer_lock = threading.Lock()
        # /metrics reads the router's Status over a plain (blocking) channel in a worker thread.
        self._sync_channel = grpc_util.make_channel(router_address, tls_root_cert=tls_root_cert,
                                                    max_message_bytes=max_message_bytes)
        sync_stub = router_pb2_grpc.RouterStub(self._sync_channel)
        self.status_collector = metrics_scrape.RouterStatusCollector(
            lambda: sync_stub.Status(router_pb2.StatusRequest(), timeout=3, metadata=self.metadata))

    # -- lifecycle (inside the server's loop)
    async def open(self) -> None:
        opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]
        if self.tls_root_cert:
            with open(self.tls_root_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
            self.channel = grpc.aio.secure_channel(self.router_address, creds, options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(self.router_address, options=opts)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        if self.local_router is not None:
            from router.local_call import LocalRouterStub
            self.stub = LocalRouterStub(self.local_router, self.stub, self.local_router.config.handler_threads)

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
                self.max_model_len = st.max_model_len or self.max_model_len   # the router's, --max-model-len's
            except grpc.RpcError as e:
                log.debug("router Status failed: %s", e)
        return self._router_model

    async def model_id(self) -> str:
        """The served model name: --served-model-name, else the router's model (a directory's last part)."""
        if self.model_name:
            return self.model_name
        m = await self.router_model()
        if not m:
            return "baton"
        return Path(m).name if ("/" in m or os.sep in m) else m

    async def served_model(self, name: str | None) -> str:
        """The model id to answer with, for a request that names `name` (or none); 404 model_not_found
        (as vLLM) for a model this server does not serve. Without --served-model-name the router's
        --model as given (e.g. a directory) is accepted too."""
        served = await self.model_id()
        metrics.set_model_name(served)   # the vllm: metrics' model_name label: the name clients use
        if name is None or name == served:
            return served
        router_model = await self.router_model()
        if not self.model_name and router_model in (None, name):   # None: the router's own call will fail
            return served
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{served}`", param="model",
                       code="model_not_found")

    async def model_card(self) -> dict:
        await self.tokenizer()   # reads the context length too
        return {"id": await self.model_id(), "object": "model", "created": self.created, "owned_by": "baton",
                "root": await self.router_model(), "parent": None, "max_model_len": self.max_model_len}

    def _load_tokenizer(self, model: str):
        with self._tokenizer_lock:
            if not self._tokenizer_tried:
                self._tokenizer_tried = True
                try:
                    from baton.model_files import load_tokenizer
                    self._tokenizer, context = load_tokenizer(model)
                    self.max_model_len = self.max_model_len or context
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

    async def local_tokenizer(self):
        """The tokenizer, or an APIError saying why there is none in this process."""
        tok = await self.tokenizer()
        if tok is not None:
            return tok
        if not self._tokenizer_tried:
            raise APIError(503, "the router did not answer: the model's tokenizer is not known yet",
                           "service_unavailable_error", code="router_unavailable")
        raise APIError(501, "this gateway has no tokenizer: the model has none, or its files are on another "
                       "machine", "server_error", code="tokenizer_unavailable")

    async def tokenize(self, body: TokenizeRequest) -> list[int]:
        """The token ids the router would see for the same prompt or conversation."""
        tok = await self.local_tokenizer()
        if body.messages is not None:
            fields = await self.chat_prompt(body.messages)
            if "prompt_token_ids" in fields:
                return fields["prompt_token_ids"]
            text, special = fields["prompt"], True
        else:
            text, special = body.prompt, body.add_special_tokens
        return await asyncio.to_thread(lambda: [int(i) for i in tok.encode(text, add_special_tokens=special)])

    async def detokenize(self, ids: list[int]) -> str:
        tok = await self.local_tokenizer()
        vocab = len(tok)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is not in the vocabulary (ids are in [0, {vocab}))",
                           param="tokens", code="invalid_value")
        return await asyncio.to_thread(tok.decode, ids)

    async def chat_prompt(self, messages: list[ChatMessage], tools: list[dict] | None = None) -> dict:
        """GenerateRequest fields for a conversation (and the tools it may call: see tools.py)."""
        msgs = [template_message("system" if m.role == "developer" else m.role, m.text(), m.tool_calls, m.tool_call_id)
                for m in messages]
        tok = await self.tokenizer()
        template = getattr(tok, "chat_template", None) if tok is not None else None
        if tools and not (isinstance(template, str) and "tools" in template):
            raise APIError(400, "tools need a model whose chat template renders them (as Qwen2.5's or Hermes' "
                           "do); this model's does not", param="tools", code="unsupported_parameter")
        if template:
            return {"prompt_token_ids": render_chat_template(tok, msgs, tools)}
        if tok is None and len(msgs) == 1 and msgs[0]["role"] == "user":
            # No tokenizer here: the router applies the model's chat template (if any) to one user turn.
            return {"prompt": msgs[0]["content"], "raw": False}
        return {"prompt": plain_chat_prompt(msgs), "raw": True}


def render_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def plain_chat_prompt(messages: list[dict]) -> str:
    """A transcript for models without a chat template: one "role: content" line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


