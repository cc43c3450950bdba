"""The in-process BATON engine: prefill newcomers on their own, embed their K/V in the running batch.

Two halves that the services use separately (prefill worker, decode worker) and that
`Engine` drives together in one process:
- `Prefiller`: one query alone -> its first token and K/V (L, 2, Hkv, P, D).
- `DecodeBatch`: the running batch; `admit` a prefilled query between two steps,
  `step` decodes one token for every row, finished or aborted rows leave at once.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from baton.config import EngineConfig
from baton.detokenizer import IncrementalDetokenizer
from baton.kv_cache import BatchKVCache
from baton.model_loader import LoadedModel
from baton.model_runner import ModelRunner
from baton.request import FinishReason, Request, Status, TokenEvent
from baton.sampling import SamplingParams, sample_batch, sample_one


class QueueFull(Exception):
    pass


@dataclass
class PrefillOutput:
    token_id: int          # the next token (output index len(generated))
    kv: torch.Tensor       # (L, 2, Hkv, P, D), model dtype, P = prompt + generated tokens


class Prefiller:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def prefill(self, prompt_ids: list[int], params: SamplingParams, generated: list[int] = ()) -> PrefillOutput:
        """Prefill the prompt plus any tokens already generated (a migrated request)."""
        return self.prefill_many([Request("", list(prompt_ids), params, output_ids=list(generated))])[0]

    def prefill_many(self, reqs: list[Request]) -> list[PrefillOutput]:
        """Several queries in one pass, each on its own (see ModelRunner.prefill_many)."""
        outs = self.runner.prefill_many([r.all_ids for r in reqs])
        return [PrefillOutput(sample_one(logits, r.params, len(r.output_ids)), kv) for r, (logits, kv) in zip(reqs, outs)]


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
        event = req.append_token(pre.token_id, self.eos_ids, self.max_len)
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

    def step(self, newcomers: list[Request] = ()) -> list[TokenEvent]:
        """One decode step for every row; finished rows leave the batch before returning.

        Newcomers, if any, are prefilled in the same pass over the weights (on their own:
        attention never mixes them with the batch), then embedded as new rows."""
        if not self.rows and not newcomers:
            return []
        last = [r.output_ids[-1] for r in self.rows]
        logits, prefills = self.runner.forward(last, self.cache if last else None, [r.all_ids for r in newcomers])
        tokens = sample_batch(logits, [r.params for r in self.rows], [len(r.output_ids) for r in self.rows])
        events = [r.append_token(t, self.eos_ids, self.max_len) for r, t in zip(self.rows, tokens)]
        for row in reversed(range(len(self.rows))):  # reversed: a removal only moves rows above it
            if self.rows[row].done:
                self._remove(row)
        return events + self.admit_group([(req, PrefillOutput(sample_one(lg, req.params, len(req.output_ids)), kv))
                                          for req, (lg, kv) in zip(newcomers, prefills)])


class Engine:
    """Prefill and decode in one process: newcomers are prefilled alone, then embedded."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        self.runner = ModelRunner(model.model)
        self.prefiller = Prefiller(self.runner)
        self.batch = DecodeBatch(self.runner, model, config.max_batch, config.kv_col_chunk)
        self.waiting: collections.OrderedDict[str, Request] = collections.OrderedDict()      # to prefill here
        self.prefilled: collections.OrderedDict[str, tuple[Request, PrefillOutput]] = collections.OrderedDict()
        self.counts = collections.Counter()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.prefilled)

    def _check_new(self, request_id: str) -> None:
        if self.num_waiting >= self.config.max_queue:
            raise QueueFull(f"queue is full ({self.config.max_queue} waiting)")
        if request_id in self.waiting or request_id in self.prefilled or request_id in self.batch.index:
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
        req = self.waiting.pop(request_id, None) or (self.prefilled.pop(request_id, None) or (None,))[0]
        if req is not None:
            req.finish(Status.CANCELLED, FinishReason.ABORT)
        else:
            req = self.batch.abort(request_id)
        if req is not None:
            self.counts["cancelled"] += 1
        return req is not None

    def has_work(self) -> bool:
        return self.num_waiting > 0 or len(self.batch) > 0

    def _admit_waiting(self) -> tuple[list[TokenEvent], list[Request]]:
        """Admit K/V prefilled elsewhere; pick the newcomers to prefill in this step's pass."""
        free = self.batch.cache.max_rows - len(self.batch)
        events = self.batch.admit_group([self.prefilled.popitem(last=False)[1]
                                         for _ in range(min(free, len(self.prefilled)))])
        budget = self.config.prefill_token_budget if len(self.batch) else self.config.idle_prefill_token_budget
        group: list[Request] = []
        while self.waiting and len(self.batch) + len(group) < self.batch.cache.max_rows:
            req = next(iter(self.waiting.values()))
            if len(req.all_ids) > budget and group:
                break  # the budget is spent; it goes first next step
            budget -= len(req.all_ids)
            del self.waiting[req.request_id]
            req.status = Status.PREFILLING
            group.append(req)
        return events, group

    def step(self) -> list[TokenEvent]:
        events, newcomers = self._admit_waiting()
        events += self.batch.step(newcomers)
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
