"""Sampling parameters: what a request asks of the sampler (no torch here, so the router and
the gateway validate them without loading it). The sampler itself is baton/engine/sampler.py.

`SamplingParams.validate` is the one place that checks them: the router (INVALID_ARGUMENT), the
HTTP gateway (400) and the workers call it, and its `InvalidParam` names the field."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from functools import cached_property

MAX_LOGPROBS = 20            # most likely tokens returned per token (OpenAI's top_logprobs cap)
MAX_LOGIT_BIAS = 1024        # entries in logit_bias
PENALTY_RANGE = 2.0          # presence / frequency penalties in [-2, 2] (OpenAI)
MAX_REPETITION_PENALTY = 10.0
MAX_SCHEMA_CHARS = 65536     # a json_schema's, regex's or grammar's length
CONSTRAINTS = ("json_schema", "regex", "grammar")   # what the output may be held to (baton/grammar.py)
# How error messages name each (the gateway maps these words back to its own field names).
CONSTRAINT_NAMES = {"json_schema": "the JSON schema", "regex": "the regex", "grammar": "the grammar"}


class InvalidParam(ValueError):
    """A sampling parameter out of range; `field` names it (as SamplingParams spells it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of one output token, from the raw logits (see baton/engine/sampler.py)."""
    logprob: float                               # the chosen token's
    top: tuple[tuple[int, float], ...] = ()      # (token_id, logprob) of the most likely tokens, best first


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # [0, 1]: tokens below min_p x the top token's probability dropped; 0 = off
    seed: int = field(default_factory=lambda: random.getrandbits(63))
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0     # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0    # subtracted once per occurrence of the token in the output
    repetition_penalty: float = 1.0   # HF/vLLM: logits of prompt or output tokens divided (> 0) or multiplied (< 0) by it
    min_tokens: int = 0               # EOS is masked until this many tokens are out
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token_id, bias in [-100, 100]) added to the logits
    logprobs: int | None = None       # None: none; k: the chosen token's logprob and the k most likely
    json_schema: str = ""             # "": free text; else a JSON schema the output follows (baton/grammar.py)
    regex: str = ""                   # "": free text; else a regular expression the whole output matches
    grammar: str = ""                 # "": free text; else an EBNF grammar (its `root` rule) the output follows

    # cached: the sampler asks every row's params at every step (a frozen dataclass: nothing changes them)
    @cached_property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of what the output is held to: json_schema, regex or grammar; None for free text."""
        return next(((k, getattr(self, k)) for k in CONSTRAINTS if getattr(self, k)), None)

    @cached_property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def processed(self) -> bool:
        """Whether the logits are changed before the token is chosen (penalties, bias, min_tokens, a constraint)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias or self.constraint)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidParam naming the field and its allowed range. With `vocab_size`, logit_bias's
        token ids are checked against the vocabulary too."""
        self._validate_basic()
        self._validate_processors(vocab_size)

    def _validate_basic(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidParam("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise InvalidParam("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidParam("min_p", f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.top_k < 0:
            raise InvalidParam("top_k", f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2 ** 64:
            raise InvalidParam("seed", f"seed must be in [0, 2^64), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidParam("stop", "stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidParam("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    def _validate_processors(self, vocab_size: int | None) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -PENALTY_RANGE <= v <= PENALTY_RANGE):
                raise InvalidParam(name, f"{name} must be in [-2, 2], got {v}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise InvalidParam("repetition_penalty", f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] "
                               f"(1 = off), got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidParam("min_tokens", f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                               f"got {self.min_tokens}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParam("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, "
                               f"got {len(self.logit_bias)}")
        top = vocab_size if vocab_size is not None else 2 ** 32
        for token, bias in self.logit_bias:
            if not 0 <= token < top:
                raise InvalidParam("logit_bias", f"logit_bias token ids must be in [0, {top}), got {token}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidParam("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} "
                                   f"for token {token}")
        self._validate_constraint()

    def _validate_constraint(self) -> None:
        """At most one constraint, of at most MAX_SCHEMA_CHARS; a schema a JSON object. Whether it
        compiles is the workers' to say (their tokenizer's)."""
        given = [k for k in CONSTRAINTS if getattr(self, k)]
        if len(given) > 1:
            raise InvalidParam(given[1], f"{given[1]} cannot be combined with {given[0]}: send one constraint")
        for kind in given:
            text = getattr(self, kind)
            if len(text) > MAX_SCHEMA_CHARS:
                raise InvalidParam(kind, f"{CONSTRAINT_NAMES[kind]} has {len(text)} characters; "
                                         f"at most {MAX_SCHEMA_CHARS}")
        if self.json_schema:
            _check_schema(self.json_schema)


def _check_schema(schema: str) -> None:
    """A JSON object (its length is checked with the other constraints')."""
    try:
        parsed = json.loads(schema)
    except ValueError as e:
        raise InvalidParam("json_schema", f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise InvalidParam("json_schema", "the JSON schema must be a JSON object")


def bias_pairs(bias: dict) -> tuple[tuple[int, float], ...]:
    """A {token_id: bias} mapping as SamplingParams holds it: sorted (token_id, bias) pairs."""
    return tuple(sorted((int(k), float(v)) for k, v in bias.items()))


def choice_grammar(choices: list[str]) -> str:
    """The EBNF grammar (xgrammar's) whose outputs are exactly the given strings (vLLM's
    guided_choice): each a JSON-escaped literal, which xgrammar's string literals read alike."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
