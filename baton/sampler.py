"""Per-row token choice.

A sampled token depends only on its row's logits, its parameters, its own token history and
(seed, index of the token): each token draws from a generator seeded by both, so a query's text
is the same whatever its batch-mates, and wherever (prefill or decode worker) the token is drawn.

Before the choice, a row's logits go through its processors, in vLLM's order: `logit_bias` added,
EOS masked while fewer than `min_tokens` are out, then the repetition penalty over prompt + output
tokens (HF/vLLM: a positive logit divided by it, a negative one multiplied), then the frequency and
presence penalties over output tokens (OpenAI: logit - frequency * count - presence * [count > 0]).
Then temperature, top-k, top-p. A request carries its prompt and output ids everywhere (a
migrated request's output ids travel as `generated_token_ids`), so this state is never lost.

Last, a row held to a constraint (a `json_schema`, `regex` or `grammar`) has every token that would
leave it masked (baton/grammar.py), from its own output alone.

Log-probabilities are those of the raw model logits (log-softmax before any processor or
temperature, vLLM's default `raw_logprobs`), in float64 for a float64 model and float32 otherwise.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import torch

from baton.grammar import Grammars, RowGrammar, check
from baton.sampling import Logprobs, SamplingParams


class Row(Protocol):
    """What the sampler reads of a request (baton.request.Request has it)."""
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    sampler_state: "TokenCounts | None"     # kept here between steps
    grammar_state: RowGrammar | None        # likewise, for a constraint (json_schema, regex, grammar)


class TokenCounts:
    """A row's token history for the penalties, as tensors kept up to date while its output grows:
    built from its ids on first use, so a request that arrives with output ids (migrated, or
    prefilled elsewhere) starts from all of them. Per step only the new ids are added."""

    def __init__(self, row: Row, vocab: int, device: torch.device):
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)      # (V,) in prompt or output
        self.counts = torch.zeros(vocab, dtype=torch.int64, device=device)   # (V,) times in the output
        if row.prompt_ids:
            self.seen[torch.tensor(row.prompt_ids, device=device)] = True
        self.counted = 0                                                     # output ids added so far

    def update(self, output_ids: list[int]) -> "TokenCounts":
        if len(output_ids) > self.counted:
            new = torch.tensor(output_ids[self.counted:], device=self.counts.device)
            self.counts.index_add_(0, new, torch.ones_like(new))
            self.seen[new] = True
            self.counted = len(output_ids)
        return self


def _counts(row: Row, x: torch.Tensor) -> TokenCounts:
    if row.sampler_state is None:
        row.sampler_state = TokenCounts(row, x.shape[-1], x.device)
    return row.sampler_state.update(row.output_ids)


def _token_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (2 ** 63))
    return g


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact tests); every other dtype is processed in float32."""
    return logits if logits.dtype == torch.float64 else logits.float()


def process(logits: torch.Tensor, row: Row, eos_ids: Collection[int],
            grammars: Grammars | None = None) -> torch.Tensor:
    """logits (V,) -> the row's processed logits (V,), a new tensor."""
    p, x = row.params, _wide(logits).clone()
    dev = x.device
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=dev)
        x[ids] += torch.tensor([b for _, b in p.logit_bias], dtype=x.dtype, device=dev)
    if len(row.output_ids) < p.min_tokens and eos_ids and not p.ignore_eos:
        x[torch.tensor(sorted(eos_ids), device=dev)] = float("-inf")
    if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        h = _counts(row, x)
        if p.repetition_penalty != 1.0:
            penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(h.seen, penalised, x)
        if p.frequency_penalty or p.presence_penalty:
            counts = h.counts.to(x.dtype)                                     # (V,)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    if p.constraint:
        allowed = _grammar(row, grammars, x.shape[-1]).allowed(row.output_ids, x.shape[-1], dev)   # (V,)
        x = x.masked_fill(~allowed, float("-inf"))
    return x


def _grammar(row: Row, grammars: Grammars | None, vocab: int) -> RowGrammar:
    if row.grammar_state is None:
        check(row.params, grammars)   # the workers did at arrival; an in-process caller may not have
        row.grammar_state = RowGrammar(grammars.compile(*row.params.constraint), vocab)
    return row.grammar_state


def sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """logits (V,), already processed -> token id; `index` is the position of this token in the output."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the first token always
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)   # the top token always stays
    g = _token_generator(params.seed, index, logits.device)
    return int(torch.multinomial(probs, 1, generator=g))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> Logprobs:
    """logits (V,) raw -> the chosen token's log-probability and the k most likely tokens'."""
    lp = torch.log_softmax(_wide(logits), dim=-1)                   # (V,)
    top = torch.topk(lp, k) if k else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return Logprobs(float(lp[token]), pairs)


def sample_rows(logits: torch.Tensor, rows: Sequence[Row], eos_ids: Collection[int] = (),
                grammars: Grammars | None = None) -> list[tuple[int, Logprobs | None]]:
    """logits (n, V) -> per row (token id, its Logprobs if asked for). Plain greedy rows share one argmax."""
    tokens = torch.argmax(logits, dim=-1).tolist() if len(rows) else []
    out = []
    for r, row in enumerate(rows):
        p = row.params
        if p.processed or not p.greedy:
            scores = process(logits[r], row, eos_ids, grammars) if p.processed else logits[r]
            tokens[r] = sample_one(scores, p, len(row.output_ids))
        lp = logprobs_of(logits[r], tokens[r], p.logprobs) if p.logprobs is not None else None
        out.append((tokens[r], lp))
    return out
