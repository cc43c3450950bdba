"""The HTTP API's response bodies, for the OpenAPI document (/openapi.json, /docs) only: the routes
build their answers in streaming.py and app.py, and tests check real answers against these models
(extra fields forbidden, so the two cannot drift apart)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Body):
    prompt_tokens: int          # each prompt counted once
    completion_tokens: int      # every choice's
    total_tokens: int


class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int                  # prompt index * n + choice
    text: str
    finish_reason: Literal["length", "stop"] | None
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None   # with return_token_ids


class CompletionResponse(_Body):
    """POST /v1/completions without `stream` (streamed: `text_completion` chunks, one choice each)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Body):
    content: list[TokenLogprob]


class ToolCallFunction(_Body):
    name: str
    arguments: str              # a JSON object, as a string


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    finish_reason: Literal["length", "stop", "tool_calls"] | None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Body):
    """POST /v1/chat/completions without `stream` (streamed: `chat.completion.chunk` chunks)."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None
    parent: None
    max_model_len: int | None


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Body):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Body):
    prompt: str


class VersionResponse(_Body):
    version: str


class HealthResponse(_Body):
    status: Literal["ok", "unavailable"]
    router: str                 # the router's gRPC health: SERVING, NOT_SERVING, UNAVAILABLE, ...


class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Body):
    error: ErrorDetail


def documented(model: type[BaseModel], *errors: int) -> dict:
    """A route's `responses`: 200 as `model`, and these error statuses as ErrorResponse."""
    return {200: {"model": model}, **{status: {"model": ErrorResponse} for status in errors}}
