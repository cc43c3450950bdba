"""Tool calling on the chat API (OpenAI's `tools`, `tool_choice`), as vLLM's `hermes` parser does it.

The tool definitions go to the model's chat template (it must render `tools`, as Qwen2.5's and
Hermes' do; SmolLM2's does not, and gets 400). A model calls a tool by writing
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the gateway takes those out of the text
into `tool_calls` (finish_reason "tool_calls") and leaves the text before them as the content.
Streamed, content flows as it comes until a tool call may begin; the calls go out in one delta
at the end. Text that is not a well-formed call stays content, as it was written.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from router.http_gateway.errors import APIError

OPEN = "<tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
SHAPE = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'


def definitions(tools: list | None, tool_choice: Any) -> list[dict] | None:
    """The tools to render for the model, or None (no tools, or tool_choice "none"); 400 for a
    tool_choice that would force a call (not done yet) or a tool that is not a named function."""
    choice = "auto" if tool_choice is None else tool_choice
    if not tools and tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice needs tools: send the tools it may choose from", param="tool_choice",
                       code="invalid_value")
    if not tools or choice == "none":
        return None
    if choice != "auto":
        raise APIError(400, 'tool_choice must be "auto" or "none": baton does not force a tool call yet',
                       param="tool_choice", code="unsupported_parameter")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function" or not isinstance(fn.get("name"), str) \
                or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {SHAPE}", param="tools", code="invalid_value")
    return tools


def calling(body) -> bool:
    """Whether the answer's text is parsed for tool calls (chat, tools given, tool_choice not "none")."""
    return definitions(getattr(body, "tools", None), getattr(body, "tool_choice", None)) is not None


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished answer; no calls: the whole text is the content."""
    calls = []
    for m in CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        args = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return text, []
    return text[:text.index(OPEN)].strip() or None, calls


def _held(text: str) -> int:
    """How many characters at the end of text could begin a tool call's tag."""
    return next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])), 0)


class CallFilter:
    """One streamed choice's text: `feed` returns what may be shown as content now (nothing from
    where a tool call may begin); `finish` returns the rest of the content and the calls."""

    def __init__(self):
        self.text, self.sent = "", 0

    def feed(self, delta: str) -> str:
        self.text += delta
        start = self.text.find(OPEN)
        end = max(self.sent, start if start >= 0 else len(self.text) - _held(self.text))
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        _, calls = parse(self.text)
        rest = "" if calls else self.text[self.sent:]   # with calls, the content before them went out already
        self.sent = len(self.text)
        return rest, calls


def call_deltas(calls: list[dict]) -> list[dict]:
    """The streamed form of the calls (one delta each, with its index)."""
    return [{"index": k, **c} for k, c in enumerate(calls)]


def template_message(role: str, content: str, tool_calls: list | None, tool_call_id: str | None) -> dict:
    """A message as chat templates read it: a call's arguments as an object (OpenAI sends a string)."""
    msg: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        msg["tool_calls"] = [_with_object_arguments(c) for c in tool_calls]
    if tool_call_id:
        msg["tool_call_id"] = tool_call_id
    return msg


def _with_object_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}
