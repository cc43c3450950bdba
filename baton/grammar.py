"""Constrained decoding: a row's tokens kept inside a JSON schema (`json_schema`; the API's
response_format, vLLM's guided_json), a regular expression (`regex`; guided_regex) or an EBNF
grammar (`grammar`; guided_grammar, and guided_choice as one).

xgrammar compiles each constraint against the model's tokenizer once per process (cached). Each row keeps
a matcher that has accepted its output so far, built from the row's own ids on first use, so a
request that arrives with output (migrated, or prefilled elsewhere) starts from all of them, as the
penalties' token counts do. The mask depends on that row alone: tokens stay batch-independent.
No free whitespace: the only spaces are xgrammar's fixed separators `, ` and `: ` (a small model
left free to add whitespace can loop on it); once the value is complete only an end-of-sequence
token is allowed.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch

from baton.errors import InvalidArgument
from baton.sampling import CONSTRAINT_NAMES, InvalidParam

CACHED_SCHEMAS = 64
_SHIFTS = torch.arange(32, dtype=torch.int32)   # a bitmask word's bits, lowest first
WHAT = {"json_schema": "a JSON schema", "regex": "a regular expression", "grammar": "a grammar"}


class Grammars:
    """One model's compiler of constraints (built on first use: xgrammar is imported only then)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Collection[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()   # (kind, text) -> compiled
        self._lock = threading.Lock()

    def compile(self, kind: str, text: str):
        """The compiled grammar of a constraint (kind: json_schema, regex or grammar); InvalidParam
        naming the kind if this model or xgrammar cannot use it."""
        if self.tokenizer is None:
            raise InvalidParam(kind, f"this model has no tokenizer, so its output cannot follow {WHAT[kind]}")
        key = (kind, text)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            try:
                import xgrammar as xgr
            except ImportError:
                raise InvalidParam(kind, f"this server cannot follow {WHAT[kind]}: install xgrammar "
                                         "(pip install --no-deps xgrammar==0.1.25)") from None
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_ids or None)
                self._compiler = xgr.GrammarCompiler(info)
            try:
                if kind == "json_schema":
                    compiled = self._compiler.compile_json_schema(text, any_whitespace=False)
                elif kind == "regex":
                    compiled = self._compiler.compile_regex(text)
                else:
                    compiled = self._compiler.compile_grammar(text)
            except Exception as e:   # xgrammar raises RuntimeError / ValueError for what it cannot use
                raise InvalidParam(kind, f"{CONSTRAINT_NAMES[kind]} cannot be used: {_first_line(e)}") from None
            self._compiled[key] = compiled
            if len(self._compiled) > CACHED_SCHEMAS:
                self._compiled.popitem(last=False)
            return compiled


def _first_line(e: Exception) -> str:
    """xgrammar's message without its C++ source position: '[12:00:00] path.cc:961: why' -> 'why'."""
    text = str(e).strip()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text.splitlines()[0]) if text else type(e).__name__


def check(params, grammars: Grammars | None) -> None:
    """A worker's check of a request's constraint before it queues (its compile is cached for the rows)."""
    if params.constraint:
        kind, text = params.constraint
        if grammars is None:
            raise InvalidParam(kind, f"no grammar compiler here: the output cannot follow {WHAT[kind]}")
        grammars.compile(kind, text)


def check_request(params, vocab_size: int, grammars: Grammars | None) -> None:
    """What a worker checks of a request's sampling before it queues: every range, logit_bias's ids
    against its vocabulary, a constraint against its tokenizer; INVALID_ARGUMENT naming the field."""
    try:
        params.validate(vocab_size)
        check(params, grammars)
    except InvalidParam as e:
        raise InvalidArgument(str(e), field=e.field) from None


class RowGrammar:
    """A row's matcher: which tokens may come next, given the output it has accepted."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)   # (1, ceil(V / 32)) int32
        self.accepted = 0

    def allowed(self, output_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar."""
        for token in output_ids[self.accepted:]:
            self.matcher.accept_token(token)   # False past the end (an ignored EOS): the mask stays EOS only
        self.accepted = len(output_ids)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1                  # (ceil(V / 32), 32)
        return bits.reshape(-1)[:vocab].bool().to(device, non_blocking=True)   # no stream sync
