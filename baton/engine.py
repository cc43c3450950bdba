"""The in-process BATON engine: prefill newcomers on their own, embed their K/V in the running batch.

Two halves that the services use separately (prefill worker, decode worker) and that
`Engine` drives together in one process:
- `Prefiller`: one query alone -> its first token and K/V (L, 2, Hkv, P, D).
- `DecodeBatch`: the running batch; `admit` a prefilled query between two steps,
  `step` decodes one token for every row, finished or aborted rows leave at once.
In one process (`Engine`, the colocated worker) newcomers' prompts are prefilled in chunks
inside the decode step's pass over the weights, under a per-step token budget (chunked
prefill): a burst neither stalls the running rows nor queues behind one long prompt.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from baton.config import EngineConfig
from baton.detokenizer import IncrementalDetokenizer
from baton.kv_cache import BatchKVCache
from baton.model_loader import LoadedModel, eos_ids_of
from baton.model_runner import ModelRunner, PromptChunk
from baton.request import FinishReason, Request, Status, TokenEvent
from baton.sampler import sample_rows
from baton.sampling import Logprobs, SamplingParams


class QueueFull(Exception):
    pass


@dataclass
class PrefillOutput:
    token_id: int          # the next token (output index len(generated))
    kv: torch.Tensor       # (L, 2, Hkv, P, D), model dtype, P = prompt + generated tokens
    logprobs: Logprobs | None = None   # the token's, when the request asked for them


class Prefiller:
    def __init__(self, runner: ModelRunner, eos_ids: frozenset[int] | None = None):
        self.runner = runner
        # min_tokens masks EOS on the first token too (the model's own EOS ids unless told)
        self.eos_ids = eos_ids_of(runner.hf, None) if eos_ids is None else eos_ids

    def prefill(self, prompt_ids: list[int], params: SamplingParams, generated: list[int] = ()) -> PrefillOutput:
        """Prefill the prompt plus any tokens already generated (a migrated request)."""
        return self.prefill_many([Request("", list(prompt_ids), params, output_ids=list(generated))])[0]

    def prefill_many(self, reqs: list[Request]) -> list[PrefillOutput]:
        """Several queries in one pass, each on its own (see ModelRunner.prefill_many)."""
        outs = self.runner.prefill_many([r.all_ids for r in reqs])
        if not outs:
            return []
        picks = sample_rows(torch.stack([lg for lg, _ in outs]), reqs, self.eos_ids)   # logits (n, V)
        return [PrefillOutput(t, kv, lp) for (t, lp), (_, kv) in zip(picks, outs)]


class DecodeBatch:
    """The running batch. Single-threaded: callers serialise admit/abort/step."""

    def __init__(self, runner: ModelRunner, model: LoadedModel, max_batch: int, col_chunk: int = 64):
        self.runner, self.tokenizer = runner, model.tokenizer
        self.eos_ids, self.max_len = model.eos_ids, model.max_len
        self.cache = BatchKVCache(runner.num_layers, runner.num_kv_heads, runner.head_dim,
                                  dtype=runner.dtype, device=runner.device, max_rows=max_batch, col_chunk=col_chunk)
        self.rows: list[Request] = []      # row r of the cache belongs to rows[r]
        self.index: dict[str, int] = {}    # request_id -> row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.cache.max_rows

    def admit(self, req: Request, pre: PrefillOutput) -> list[TokenEvent]:
        """Embed a prefilled request; emits its newest token. It joins the batch unless already done."""
        if req.detok is None and self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.all_ids, req.params.stop)
        event = req.append_token(pre.token_id, self.eos_ids, self.max_len, pre.logprobs)
        if not req.done:
            self.index[req.request_id] = self.cache.insert(pre.kv)
            self.rows.append(req)
            req.status = Status.RUNNING
        return [event]

    def admit_group(self, arrivals: list[tuple[Request, PrefillOutput]]) -> list[TokenEvent]:
        """Admit several at once: the cache makes room for all of them in one reallocation."""
        if not arrivals:
            return []
        self.cache.reserve(len(self.rows) + len(arrivals), max(pre.kv.shape[3] for _, pre in arrivals))
        return [e for req, pre in arrivals for e in self.admit(req, pre)]

    def abort(self, request_id: str) -> Request | None:
        row = self.index.get(request_id)
        if row is None:
            return None
        req = self.rows[row]
        self._remove(row)
        req.finish(Status.CANCELLED, FinishReason.ABORT)
        return req

    def _remove(self, row: int) -> None:
        req = self.rows[row]
        del self.index[req.request_id]
        moved = self.cache.remove(row)
        last = self.rows.pop()
        if moved is not None:
            self.rows[row] = last
            self.index[last.request_id] = row

    def step(self, chunks: list[tuple[Request, PromptChunk]] = ()) -> list[TokenEvent]:
        """One decode step for every row; finished rows leave the batch before returning.

        Prompt chunks of newcomers, if any, are prefilled in the same pass over the weights (on
        their own: attention never mixes them with the batch); a newcomer whose last chunk this
        was gets its first token and is embedded as a new row."""
        if not self.rows and not chunks:
            return []
        last = [r.output_ids[-1] for r in self.rows]
        logits, prompt_logits = self.runner.forward(last, self.cache if last else None, [c for _, c in chunks])
        picks = sample_rows(logits, self.rows, self.eos_ids)
        events = [r.append_token(t, self.eos_ids, self.max_len, lp) for r, (t, lp) in zip(self.rows, picks)]
        for row in reversed(range(len(self.rows))):  # reversed: a removal only moves rows above it
            if self.rows[row].done:
                self._remove(row)
        done = [(req, c, lg) for (req, c), lg in zip(chunks, prompt_logits) if lg is not None]
        picks = sample_rows(torch.stack([lg for *_, lg in done]), [r for r, *_ in done], self.eos_ids) if done else []
        return events + self.admit_group([(req, PrefillOutput(t, c.kv, lp)) for (req, c, _), (t, lp) in zip(done, picks)])


class Engine:
    """Prefill and decode in one process: newcomers are prefilled in chunks inside the decode
    step's pass, then embedded by vector shaping; K/V prefilled elsewhere joins between steps."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        self.runner = ModelRunner(model.model)
        self.prefiller = Prefiller(self.runner, model.eos_ids)
        self.batch = DecodeBatch(self.runner, model, config.max_batch, config.kv_col_chunk)
        self.waiting: collections.OrderedDict[str, Request] = collections.OrderedDict()      # to prefill here
        self.prefilling: collections.OrderedDict[str, _Prefill] = collections.OrderedDict()  # chunks under way
        self.prefilled: collections.OrderedDict[str, tuple[Request, PrefillOutput]] = collections.OrderedDict()
        self.counts = collections.Counter()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.prefilled)

    def _check_new(self, request_id: str) -> None:
        if self.num_waiting >= self.config.max_queue:
            raise QueueFull(f"queue is full ({self.config.max_queue} waiting)")
        if any(request_id in d for d in (self.waiting, self.prefilling, self.prefilled, self.batch.index)):
            raise ValueError(f"duplicate request_id {request_id!r}")

    def add_request(self, req: Request) -> None:
        """A new query, to be prefilled in this process."""
        self._check_new(req.request_id)
        self.waiting[req.request_id] = req

    def add_prefilled(self, req: Request, pre: PrefillOutput) -> None:
        """A query prefilled elsewhere (a prefill worker); it takes the next free row."""
        self._check_new(req.request_id)
        req.status = Status.TRANSFERRING
        self.prefilled[req.request_id] = (req, pre)

    def abort(self, request_id: str) -> bool:
        req = self.waiting.pop(request_id, None)
        if req is None and request_id in self.prefilling:
            req = self.prefilling.pop(request_id).req
        if req is None and request_id in self.prefilled:
            req = self.prefilled.pop(request_id)[0]
        if req is not None:
            req.finish(Status.CANCELLED, FinishReason.ABORT)
        else:
            req = self.batch.abort(request_id)
        if req is not None:
            self.counts["cancelled"] += 1
        return req is not None

    def has_work(self) -> bool:
        return self.num_waiting > 0 or len(self.batch) > 0

    def _schedule(self) -> tuple[list[TokenEvent], list[tuple[Request, PromptChunk]]]:
        """Admit K/V prefilled elsewhere; cut this step's prompt chunks, oldest prompt first, up to
        the token budget. A prompt being prefilled holds the row it will take."""
        free = self.batch.cache.max_rows - len(self.batch) - len(self.prefilling)
        events = self.batch.admit_group([self.prefilled.popitem(last=False)[1]
                                         for _ in range(min(free, len(self.prefilled)))])
        budget = self.config.prefill_chunk_tokens
        chunks = []
        for p in self._prefills():
            ids = p.req.all_ids[p.done:p.done + budget]
            chunks.append((p.req, PromptChunk(ids, p.done, p.kv)))
            p.done += len(ids)
            budget -= len(ids)
            if budget <= 0:
                break
        for req, c in chunks:
            if c.last:
                del self.prefilling[req.request_id]
        return events, chunks

    def _prefills(self):
        """Prompts under way, oldest first, then waiting ones started as they are reached (each
        takes its K/V buffer and the row it will hold)."""
        yield from list(self.prefilling.values())
        while self.waiting and len(self.batch) + len(self.prefilling) < self.batch.cache.max_rows:
            req = self.waiting.popitem(last=False)[1]
            req.status = Status.PREFILLING
            p = self.prefilling[req.request_id] = _Prefill(req, self.runner.new_kv(len(req.all_ids)))
            yield p

    def step(self) -> list[TokenEvent]:
        events, chunks = self._schedule()
        events += self.batch.step(chunks)
        self.counts["completed"] += sum(1 for e in events if e.finish_reason is not None)
        return events

    def stats(self) -> dict:
        return {"running": len(self.batch), "waiting": self.num_waiting, "batch_width": self.batch.cache.width,
                "kv_cache_bytes": self.batch.cache.nbytes(), "kv_used_bytes": self.batch.cache.used_bytes(), **self.counts}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (tests, `baton generate --local`)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [Request(f"local-{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for r in reqs:
            self.add_request(r)
        while self.has_work():
            self.step()
        return reqs


@dataclass
class _Prefill:
    """A prompt being prefilled here over several steps: its K/V buffer and how far it got."""
    req: Request
    kv: torch.Tensor      # (L, 2, Hkv, P, D)
    done: int = 0         # tokens whose K/V is in kv
