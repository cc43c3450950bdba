"""Request bodies of the HTTP API: the raw body checked (JSON, nesting, Unicode), the pydantic
models with every range the router's protobuf fields impose, and their failures as 400s naming
the field. Nothing a client sends reaches protobuf or the router before passing here."""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from baton.sampling import CONSTRAINTS, InvalidParam, SamplingParams, bias_pairs
from router.http_gateway import constraints, unsupported
from router.http_gateway.errors import APIError

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
MAX_JSON_DEPTH = 32   # a chat body needs 5 levels; a client's tool schemas a few more
MAX_N = 16            # choices per request: each is a request of its own to the router
MAX_PROMPTS = 64      # prompts in one /v1/completions request (each n choices, each a router request)


# ---- the raw body ----------------------------------------------------------------------------------
def _no_constant(word: str):
    raise ValueError(f"{word} is not a JSON value")


def parse_body(raw: bytes) -> dict:
    """The body as a JSON object, or an APIError(400) saying why not."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_tree(data)
    return data


def _check_tree(data: dict) -> None:
    """At most MAX_JSON_DEPTH levels of arrays and objects, and text that is valid Unicode (JSON's
    escapes can spell a lone surrogate, "\\ud800", which no UTF-8 encoder accepts)."""
    stack: list[tuple[Any, int, str | None]] = [(data, 1, None)]
    while stack:
        o, depth, field = stack.pop()
        if isinstance(o, str):
            _check_text(o, field)
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           param=field, code="invalid_json")
        if isinstance(o, dict):
            for k, v in o.items():
                _check_text(k, field)
                if isinstance(v, (str, list, dict)):
                    stack.append((v, depth + 1, field or k))
        else:
            stack.extend((v, depth + 1, field) for v in o if isinstance(v, (str, list, dict)))


def _check_text(s: str, field: str | None) -> None:
    if s.isascii():
        return
    try:
        s.encode()
    except UnicodeEncodeError as e:
        raise APIError(400, f"{field or 'the request body'}: text holds a lone surrogate ({s[e.start]!r}) "
                       "at character " + str(e.start) + "; send valid Unicode", param=field,
                       code="invalid_value") from None


# ---- the models ------------------------------------------------------------------------------------
class GenerateBody(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Fields that would change the output
    and that baton does not honour are refused before this model sees them (UNSUPPORTED, a table of
    unsupported.py); other unknown fields are ignored."""
    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED: ClassVar[dict[str, unsupported.Rule]] = {}

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=U32_MAX)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=U64_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    # Logit processors: their ranges are checked in one place, baton.sampling.SamplingParams.validate
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # vLLM's extras and baton's (send with the openai client's extra_body=...)
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0, le=U32_MAX)
    top_k: int | None = Field(None, ge=0, le=U32_MAX)
    min_p: float | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    # Constrained output (one of): OpenAI's response_format; vLLM's guided_json (a schema),
    # guided_regex, guided_choice, guided_grammar (EBNF), or its newer structured_outputs holding one
    # of json, regex, choice, grammar, json_object
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def continuous_usage(self) -> bool:
        """vLLM's stream_options.continuous_usage_stats (with include_usage): usage in every chunk."""
        return self.include_usage and bool((self.stream_options or {}).get("continuous_usage_stats"))

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def num_logprobs(self) -> int | None:
        """How many most likely tokens to return per token (None: no logprobs)."""
        return None

    @property
    def constraint_param(self) -> str:
        """The field that holds the output's constraint, as the API spells it (errors name it)."""
        return constraints.param(self)

    def constraint(self) -> dict[str, str]:
        """The GenerateRequest field holding the output to a constraint ({} for free text)."""
        return constraints.from_body(self)

    def sampling_fields(self, max_tokens: int | None) -> dict:
        """The GenerateRequest fields other than the prompt (every value in its protobuf range)."""
        f = dict(max_new_tokens=max_tokens or 0, temperature=1.0 if self.temperature is None else self.temperature,
                 top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                 min_p=self.min_p or 0.0, stop=self.stops(),
                 ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty or 0.0,
                 frequency_penalty=self.frequency_penalty or 0.0,
                 repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                 min_tokens=self.min_tokens or 0, logit_bias=self.logit_bias or {}, **self.constraint())
        if self.seed is not None:
            f["seed"] = self.seed
        if self.num_logprobs is not None:
            f["logprobs"] = self.num_logprobs
        return f


class ContentPart(BaseModel):
    """A text part of a message's content (ChatMessage checks the parts first: text only)."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None                  # a tool's answer: to which call

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """Parts checked here, so that a refusal names the part and its type (not pydantic's union internals)."""
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    what = (f"is a {type(part).__name__}, not an object" if not isinstance(part, dict) else
                            f"has type {kind!r}" if kind is not None else "has no type")
                    raise ValueError(f"content part {i} {what}: only text parts "
                                     '({"type": "text", "text": "..."}) are supported; this model reads text only')
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i}: its text must be a string")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(GenerateBody):
    UNSUPPORTED: ClassVar[dict[str, unsupported.Rule]] = unsupported.CHAT
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[dict[str, Any]] | None = None      # see tools.py
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=U32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=U32_MAX)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerateBody):
    UNSUPPORTED: ClassVar[dict[str, unsupported.Rule]] = unsupported.COMPLETIONS
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=U32_MAX)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one (a string or token ids) or a batch (a list of either), as OpenAI and vLLM take."""
        v = self.prompt
        return list(v) if isinstance(v, list) and isinstance(v[0], (str, list)) else [v]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            batch = v if isinstance(v[0], (str, list)) else [v]
            if len(batch) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(batch)}")
            for i, p in enumerate(batch):
                where = f"the prompt at index {i}" if batch is v else "prompt"
                if not p:
                    raise ValueError(f"{where} must not be empty")
                if isinstance(p, list) and any(t < 0 or t > U32_MAX for t in p):
                    raise ValueError(f"{where}: token ids must be in [0, 2^32)")
        return v


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a prompt, as /v1/completions encodes it, or a conversation, as
    /v1/chat/completions renders it."""
    model_config = ConfigDict(extra="ignore")
    UNSUPPORTED: ClassVar[dict[str, unsupported.Rule]] = {
        "add_generation_prompt": unsupported.CHAT["add_generation_prompt"],
        "continue_final_message": unsupported.CHAT["continue_final_message"],
        "chat_template": unsupported.CHAT["chat_template"],
        "return_token_strs": ((False,), "return token strings")}
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True   # for a prompt; a conversation's template holds its own

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape): token ids -> text."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(..., max_length=1 << 20)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v):
        if any(t < 0 or t > U32_MAX for t in v):
            raise ValueError("token ids must be in [0, 2^32)")
        return v


def check_sampling(fields: dict, chat: bool, constraint_param: str = "response_format") -> None:
    """GenerateRequest fields through the one validation of sampling parameters (SamplingParams.validate),
    its refusal as a 400 naming the field as the HTTP API spells it. A max_tokens left to the server's
    default is checked by the router."""
    kw = {k: v for k, v in fields.items() if k in SamplingParams.__dataclass_fields__}
    kw.update(max_new_tokens=fields["max_new_tokens"] or U32_MAX, stop=tuple(fields["stop"]),
              logit_bias=bias_pairs(fields["logit_bias"]))
    try:
        SamplingParams(**kw).validate()
    except InvalidParam as e:
        param = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs" if chat else "logprobs",
                 **dict.fromkeys(CONSTRAINTS, constraint_param)}.get(e.field, e.field)
        msg = str(e).replace("max_new_tokens", "max_tokens")
        raise APIError(400, param + msg.removeprefix(e.field) if msg.startswith(e.field) else msg, param=param,
                       code="invalid_value") from None


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


def parse_request(raw: bytes, model: type[BaseModel]):
    """The body checked and validated as `model`, or an APIError(400)."""
    data = parse_body(raw)
    unsupported.check(data, getattr(model, "UNSUPPORTED", {}))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
