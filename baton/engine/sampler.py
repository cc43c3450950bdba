"""Token choice for a whole batch at once, on the device.

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

from baton.engine.kernels import cpu_kernels_for
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
            self.seen[on(device, row.prompt_ids)] = True
        self.counted = 0                                                     # output ids added so far

    def update(self, output_ids: list[int]) -> "TokenCounts":
        if len(output_ids) > self.counted:
            new = on(self.counts.device, output_ids[self.counted:])
            self.counts.index_add_(0, new, torch.ones_like(new))
            self.seen[new] = True
            self.counted = len(output_ids)
        return self


def _counts(row: Row, x: torch.Tensor) -> TokenCounts:
    if row.sampler_state is None:
        row.sampler_state = TokenCounts(row, x.shape[-1], x.device)
    return row.sampler_state.update(row.output_ids)


def on(device: torch.device, values, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, copied without waiting for the device: a blocking
    copy would sync the stream (wait for the step's kernels) once per parameter column."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _token_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (2 ** 63))
    return g


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact tests); every other dtype is processed in float32."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as an (m, 1) column in `like`'s dtype and device."""
    return on(like.device, values, like.dtype)[:, None]


def _rows_where(rows: Sequence[Row], test) -> list[int]:
    return [r for r, row in enumerate(rows) if test(row.params, row)]


def process(logits: torch.Tensor, rows: Sequence[Row], eos_ids: Collection[int],
            grammars: Grammars | None = None) -> torch.Tensor:
    """logits (n, V) -> the rows' processed logits (n, V), a new tensor; rows without processors
    keep their logits exactly."""
    x = _wide(logits).clone()
    dev, dt = x.device, x.dtype
    bias = [(r, t, b) for r, row in enumerate(rows) for t, b in row.params.logit_bias]
    if bias:
        ri, ti, bi = zip(*bias)
        x.index_put_((on(dev, ri), on(dev, ti)), on(dev, bi, dt), accumulate=True)
    held = _rows_where(rows, lambda p, row: len(row.output_ids) < p.min_tokens and not p.ignore_eos)
    if held and eos_ids:
        x[on(dev, held)[:, None], on(dev, sorted(eos_ids))[None, :]] = float("-inf")
    pen = _rows_where(rows, lambda p, row: p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty)
    if pen:
        idx = on(dev, pen)
        hist = [_counts(rows[r], x) for r in pen]
        seen = torch.stack([h.seen for h in hist])                                   # (m, V)
        counts = torch.stack([h.counts for h in hist]).to(dt)                        # (m, V)
        params = [rows[r].params for r in pen]
        rep = _column([p.repetition_penalty for p in params], x)
        sub = x[idx]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= _column([p.frequency_penalty for p in params], x) * counts \
            + _column([p.presence_penalty for p in params], x) * (counts > 0).to(dt)
        x[idx] = sub
    held_to = _rows_where(rows, lambda p, row: p.constraint)
    if held_to:
        V = x.shape[-1]
        allowed = torch.stack([_grammar(rows[r], grammars, V).allowed(rows[r].output_ids, V, dev) for r in held_to])
        idx = on(dev, held_to)
        x[idx] = x[idx].masked_fill(~allowed, float("-inf"))
    return x


def _grammar(row: Row, grammars: Grammars | None, vocab: int) -> RowGrammar:
    if row.grammar_state is None:
        check(row.params, grammars)   # the workers did at arrival; an in-process caller may not have
        row.grammar_state = RowGrammar(grammars.compile(*row.params.constraint), vocab)
    return row.grammar_state


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x (n, V) -> (n,) int64, torch.argmax(x, -1): by baton's kernel on a CPU (torch's compares one
    index at a time: greedy sampling took 2.3 of a 32-row decode step's ~60 ms on a 2-core Xeon, 0.46
    with the kernel)."""
    kernels = cpu_kernels_for(x.device, x.dtype)
    return kernels.argmax_rows(x) if kernels is not None and x.dim() == 2 and x.shape[-1] else torch.argmax(x, dim=-1)


def choose(scores: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int]) -> torch.Tensor:
    """scores (n, V), already processed -> (n,) token ids, on the device. `indices[r]` is the
    position in its output of row r's token (with its seed, what its draw depends on)."""
    tokens = argmax(scores)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    ps = [params[r] for r in sampled]
    s = scores[on(scores.device, sampled)].float()
    s /= _column([p.temperature for p in ps], s)                                     # (m, V)
    V = s.shape[-1]
    if any(0 < p.top_k < V for p in ps) or any(p.top_p < 1.0 for p in ps):
        ordered, order = torch.sort(s, dim=-1, descending=True)                       # (m, V)
        kth = ordered.gather(1, on(s.device, [[(p.top_k if 0 < p.top_k < V else V) - 1] for p in ps]))  # (m, 1)
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))                   # top-k, ties kept
        head = torch.softmax(ordered, dim=-1)
        # top-p: drop a token once the mass before it reaches top_p (the first always stays); 1.0 = off
        top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in ps], head)
        ordered = ordered.masked_fill(head.cumsum(-1) - head >= top_p, float("-inf"))
        s = s.scatter(1, order, ordered)
    probs = torch.softmax(s, dim=-1)
    if any(p.min_p > 0.0 for p in ps):   # the top token always stays
        probs = probs.masked_fill(probs < _column([p.min_p for p in ps], probs) * probs.amax(-1, keepdim=True), 0.0)
    noise = torch.empty_like(probs)
    for j, (r, p) in enumerate(zip(sampled, ps)):
        noise[j].exponential_(generator=_token_generator(p.seed, indices[r], probs.device))
    tokens[on(tokens.device, sampled)] = argmax(probs / noise.clamp_min_(1e-30))
    return tokens


def sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """logits (V,), already processed -> token id; `index` is the position of this token in the output."""
    return int(choose(logits[None], [params], [index])[0])


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int]) -> list[Logprobs]:
    """logits (m, V) raw, tokens (m,) chosen -> each row's chosen token's log-probability and its
    ks[r] most likely tokens' (one copy to the host)."""
    lp = torch.log_softmax(_wide(logits), dim=-1)                                    # (m, V)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(ks)
    top = torch.topk(lp, k) if k else None
    ids, vals = (top.indices.tolist(), top.values.tolist()) if top is not None else ([[]] * len(ks), [[]] * len(ks))
    return [Logprobs(c, tuple(zip(i[:kr], v[:kr]))) for c, i, v, kr in zip(chosen, ids, vals, ks)]


def sample_rows(logits: torch.Tensor, rows: Sequence[Row], eos_ids: Collection[int] = (),
                grammars: Grammars | None = None) -> list[tuple[int, Logprobs | None]]:
    """logits (n, V) -> per row (token id, its Logprobs if asked for), the whole batch at once."""
    if not len(rows):
        return []
    params = [row.params for row in rows]
    if all(p.greedy and not p.processed for p in params):
        chosen = argmax(logits)
    else:
        scores = process(logits, rows, eos_ids, grammars) if any(p.processed for p in params) else logits
        chosen = choose(scores, params, [len(row.output_ids) for row in rows])
    tokens = chosen.tolist()
    lps: list[Logprobs | None] = [None] * len(rows)
    asked = [r for r, p in enumerate(params) if p.logprobs is not None]
    if asked:
        idx = on(logits.device, asked)
        for r, lp in zip(asked, logprobs_of(logits[idx], chosen[idx], [params[r].logprobs for r in asked])):
            lps[r] = lp
    return list(zip(tokens, lps))
