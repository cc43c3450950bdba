"""Prefill: one query (or several, each on its own) -> its first token and its K/V
(L, 2, Hkv, P, D), what a prefill worker sends and a decode batch admits."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.engine.prefix_cache import PrefixCache
from baton.engine.runner import ModelRunner, PromptChunk
from baton.engine.sampler import sample_rows
from baton.grammar import Grammars
from baton.model_loader import eos_ids_of
from baton.request import Request
from baton.sampling import Logprobs, SamplingParams


@dataclass
class PrefillOutput:
    token_id: int          # the next token (output index len(generated))
    kv: torch.Tensor       # (L, 2, Hkv, P, D), model dtype, P = prompt + generated tokens
    logprobs: Logprobs | None = None   # the token's, when the request asked for them


class Prefiller:
    def __init__(self, runner: ModelRunner, eos_ids: frozenset[int] | None = None, grammars: Grammars | None = None,
                 prefixes: PrefixCache | None = None):
        self.runner, self.grammars = runner, grammars   # grammars: for requests with a constraint
        self.prefixes = prefixes or PrefixCache(0)
        # min_tokens masks EOS on the first token too (the model's own EOS ids unless told)
        self.eos_ids = eos_ids_of(runner.hf, None) if eos_ids is None else eos_ids

    def prefill(self, prompt_ids: list[int], params: SamplingParams, generated: list[int] = ()) -> PrefillOutput:
        """Prefill the prompt plus any tokens already generated (a migrated request)."""
        return self.prefill_many([Request("", list(prompt_ids), params, output_ids=list(generated))])[0]

    def prefill_many(self, reqs: list[Request]) -> list[PrefillOutput]:
        """Several queries in one pass, each on its own; a cached prefix of one is not computed again."""
        if not reqs:
            return []
        chunks = []
        for r in reqs:
            kv, cached = self.prefixes.new_kv(self.runner, r.all_ids)
            chunks.append(PromptChunk(r.all_ids[cached:], cached, kv))
        _, logits = self.runner.forward([], None, chunks)
        for r, c in zip(reqs, chunks):
            self.prefixes.add(r.all_ids, c.kv)
        picks = sample_rows(torch.stack(logits), reqs, self.eos_ids, self.grammars)  # logits (n, V)
        return [PrefillOutput(t, c.kv, lp) for (t, lp), c in zip(picks, chunks)]
