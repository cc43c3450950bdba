"""The in-process BATON engine: prefill newcomers on their own, embed their K/V in the running batch.

Two halves that the services use separately (prefill worker, decode worker) and that
`Engine` drives together in one process:
- `Prefiller`: one query alone -> its first token and K/V (L, 2, Hkv, P, D).
- `DecodeBatch`: the running batch; `admit` a prefilled query between two steps,
  `step` decodes one token for every row, finished or aborted rows leave at once. Which request
  holds which row is recorded once, in its cache (kv_cache.py `BatchKVCache`: join, leave, the
  step's inputs); the batch addresses rows by request id only.
In one process (`Engine`, the colocated worker) newcomers' prompts are prefilled in chunks
inside the decode step's pass over the weights, under a per-step token budget (chunked
prefill): a burst neither stalls the running rows nor queues behind one long prompt. A step
with no prompt piece runs baton/decode_graphs.py's static-buffer step (CUDA graphs on a GPU).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch

from baton.config import EngineConfig
from baton.decode_graphs import DecodeGraphs
from baton.detokenizer import IncrementalDetokenizer
from baton.errors import InvalidArgument
from baton.grammar import Grammars
from baton.kv_cache import BatchKVCache, KVCapacity, kv_capacity, token_bytes
from baton.model_loader import LoadedModel, eos_ids_of
from baton.model_runner import ModelRunner, PromptChunk
from baton.prefix_cache import PrefixCache
from baton.request import FinishReason, Request, Status, TokenEvent
from baton.sampler import sample_rows
from baton.sampling import Logprobs, SamplingParams
from baton.scheduler import Scheduler
from baton.step_budget import StepBudget


@dataclass
class PrefillOutput:
    token_id: int          # the next token (output index len(generated))
    kv: torch.Tensor       # (L, 2, Hkv, P, D), model dtype, P = prompt + generated tokens
    logprobs: Logprobs | None = None   # the token's, when the request asked for them


def default_capacity(r: ModelRunner, model: LoadedModel, rows: int, config: EngineConfig = EngineConfig()) -> KVCapacity:
    """The batch cache's size from the config's memory budget and context cap (baton/kv_cache.py)."""
    return kv_capacity(rows, token_bytes(r.num_layers, r.num_kv_heads, r.head_dim, r.dtype), model.max_len,
                       max_model_len=config.max_model_len, budget=config.kv_cache_memory, device=r.device,
                       gpu_memory_utilization=config.gpu_memory_utilization)


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


class DecodeBatch:
    """The running batch. Single-threaded: callers serialise admit/abort/step."""

    def __init__(self, runner: ModelRunner, model: LoadedModel, max_batch: int, capacity: KVCapacity | None = None,
                 *, graphs: bool = False, buckets: list[int] | None = None):
        """`capacity`: the cache's size (Engine sizes it from its memory budget); by default room for
        `max_batch` rows of the model's whole context, within the default budget. `graphs`: capture
        the decode step as CUDA graphs (a CUDA runner); `buckets`: pad eager steps to these batch
        sizes (tests)."""
        self.runner, self.tokenizer, self.grammars = runner, model.tokenizer, model.grammars
        capacity = capacity or default_capacity(runner, model, max_batch)
        self.eos_ids, self.max_len = model.eos_ids, capacity.max_len
        self.cache = BatchKVCache(runner.num_layers, runner.num_kv_heads, runner.head_dim,
                                  dtype=runner.dtype, device=runner.device, max_rows=max_batch, max_cols=capacity.cols)
        self.decode = DecodeGraphs(runner, max_batch, capture=graphs, buckets=buckets)   # after the cache: its memory first

    def __len__(self) -> int:
        return self.cache.num_rows

    @property
    def rows(self) -> list[Request]:
        """The running requests in row order (the cache records who holds which row)."""
        return self.cache.occupants

    def get(self, request_id: str) -> Request | None:
        return self.cache.get(request_id)

    @property
    def full(self) -> bool:
        return len(self) >= self.cache.max_rows

    def admit(self, req: Request, pre: PrefillOutput) -> list[TokenEvent]:
        """Embed a prefilled request; emits its newest token. It joins the batch unless already done."""
        if req.detok is None and self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.all_ids, req.params.stop)
        event = req.append_token(pre.token_id, self.eos_ids, self.max_len, pre.logprobs)
        if not req.done:
            self.cache.join(req.request_id, req, pre.kv)
            req.status = Status.RUNNING
        return [event]

    def admit_group(self, arrivals: list[tuple[Request, PrefillOutput]]) -> list[TokenEvent]:
        """Admit several at once: the window moves at most once for all of them."""
        if not arrivals:
            return []
        self.cache.reserve(len(self) + len(arrivals), max(pre.kv.shape[3] for _, pre in arrivals))
        return [e for req, pre in arrivals for e in self.admit(req, pre)]

    def abort(self, request_id: str) -> Request | None:
        req = self.cache.leave(request_id)
        if req is not None:
            req.finish(Status.CANCELLED, FinishReason.ABORT)
        return req

    def free(self, request_id: str) -> None:
        """Free a request's row, if it holds one (its status is the caller's business)."""
        self.cache.leave(request_id)

    def step(self, chunks: list[tuple[Request, PromptChunk]] = ()) -> list[TokenEvent]:
        """One decode step for every row; finished rows leave the batch before returning.

        Prompt chunks of newcomers, if any, are prefilled in the same pass over the weights (on
        their own: attention never mixes them with the batch); a newcomer whose last chunk this
        was gets its first token and is embedded as a new row."""
        rows = self.rows                                   # row order, as the step computes them
        if not rows and not chunks:
            return []
        last = [r.output_ids[-1] for r in rows]
        if chunks:
            logits, prompt_logits = self.runner.forward(last, self.cache if last else None, [c for _, c in chunks])
        else:   # decode only: the static-buffer step (CUDA graphs where captured)
            logits, prompt_logits = self.decode.step(last, self.cache), []
        picks = sample_rows(logits, rows, self.eos_ids, self.grammars)
        events = [r.append_token(t, self.eos_ids, self.max_len, lp) for r, (t, lp) in zip(rows, picks)]
        for r in rows:
            if r.done:
                self.cache.leave(r.request_id)
        done = [(req, c, lg) for (req, c), lg in zip(chunks, prompt_logits) if lg is not None]
        picks = (sample_rows(torch.stack([lg for *_, lg in done]), [r for r, *_ in done], self.eos_ids, self.grammars)
                 if done else [])
        return events + self.admit_group([(req, PrefillOutput(t, c.kv, lp)) for (req, c, _), (t, lp) in zip(done, picks)])


class Engine:
    """Prefill and decode in one process: newcomers are prefilled in chunks inside the decode
    step's pass, then embedded by vector shaping; K/V prefilled elsewhere joins between steps.
    A step is plan (baton/scheduler.py, no model) -> run (the batch) -> finish: every request
    leaves through `finish_and_free`, which frees what it held and counts how it ended."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        self.runner = ModelRunner(model.model)
        self.prefixes = PrefixCache(config.prefix_cache_mb << 20)   # shared with the prefiller: one thread runs both
        self.prefiller = Prefiller(self.runner, model.eos_ids, model.grammars, self.prefixes)
        self.capacity = default_capacity(self.runner, model, config.max_batch, config)
        self.batch = DecodeBatch(self.runner, model, config.max_batch, self.capacity,
                                 graphs=self.runner.device.type == "cuda" and not config.enforce_eager)
        self.scheduler = Scheduler(config.max_batch, config.max_queue)
        self.budget = StepBudget(config.prefill_chunk_tokens, config.step_time_ms)
        self.requests: dict[str, Request] = {}          # every request in the engine, queued or running
        self.prompt_kv: dict[str, torch.Tensor] = {}    # (L, 2, Hkv, P, D) of each prompt being prefilled here
        self.counts = collections.Counter()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler)

    def describe(self) -> str:
        """What the engine holds, for the start-up log: its cache's size and how it steps."""
        return f"{self.capacity.describe()}; {self.batch.decode.describe()}; {self.budget.describe()}"

    @property
    def max_len(self) -> int:
        """Prompt + output tokens a request may reach here (the model's context, or less if the
        cache's budget or --max-model-len says so)."""
        return self.batch.max_len

    def _check_new(self, req: Request) -> None:
        self.scheduler.check_room()
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        if len(req.all_ids) >= self.max_len:
            raise InvalidArgument(f"{len(req.all_ids)} tokens do not fit the context of {self.max_len}", field="prompt")

    def add_request(self, req: Request) -> None:
        """A new query, to be prefilled in this process."""
        self._check_new(req)
        self.scheduler.add(req)
        self.requests[req.request_id] = req

    def add_prefilled(self, req: Request, pre: PrefillOutput) -> None:
        """A query prefilled elsewhere (a prefill worker); it takes the next free row."""
        self._check_new(req)
        self.scheduler.add_prefilled(req, pre)
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish_and_free(req, Status.CANCELLED, FinishReason.ABORT)
        return req is not None

    def finish_and_free(self, req: Request, status: Status, reason: FinishReason | None) -> None:
        """The one way out of the engine: the request leaves its queue or its row (a row that
        produced its last token has left in that step), the K/V of its prompt is dropped, its end
        is recorded once and counted."""
        rid = req.request_id
        if self.requests.pop(rid, None) is None:
            return
        self.scheduler.remove(rid)
        self.prompt_kv.pop(rid, None)
        self.batch.free(rid)
        if not req.done:
            req.finish(status, reason)
        self.counts["completed" if req.status is Status.FINISHED else "cancelled"] += 1

    def has_work(self) -> bool:
        return bool(self.requests)

    def _start_prompt(self, req: Request) -> int:
        """A prompt starts its prefill here: its K/V buffer, with the longest cached prefix copied
        in; returns that prefix's length (the scheduler prefills from there)."""
        self.prompt_kv[req.request_id], cached = self.prefixes.new_kv(self.runner, req.all_ids)
        return cached

    def step(self) -> list[TokenEvent]:
        budget = self.budget.tokens(len(self.batch), self.scheduler.starting(len(self.batch)))
        plan = self.scheduler.admit(len(self.batch), budget)
        for req in plan.started:
            self.scheduler.begin(req, self._start_prompt(req))
        plan.pieces = self.scheduler.pieces(budget)
        chunks = [(p.req, PromptChunk(p.ids, p.start, self.prompt_kv[p.req.request_id])) for p in plan.pieces]
        for p in plan.pieces:
            if p.last:   # its K/V joins the batch in this step (a copy): the cache keeps the buffer
                self.prefixes.add(p.req.all_ids, self.prompt_kv.pop(p.req.request_id))
        events = self.batch.admit_group(plan.joining)
        rows, began = len(self.batch), time.perf_counter()
        events += self.batch.step(chunks)     # ends on the host's copy of the new tokens: the step's true time
        self.budget.observe(rows, sum(len(p.ids) for p in plan.pieces), time.perf_counter() - began)
        for e in events:
            if e.finish_reason is not None:
                req = self.requests[e.request_id]
                self.finish_and_free(req, req.status, e.finish_reason)
        return events

    def stats(self) -> dict:
        return {"running": len(self.batch), "waiting": self.num_waiting, "joining": len(self.scheduler.prefilled),
                "batch_width": self.batch.cache.width,
                "kv_cache_bytes": self.batch.cache.nbytes(), "kv_used_bytes": self.batch.cache.used_bytes(),
                **self.prefixes.stats(), **self.counts}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (tests, `baton generate --local`)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [Request(f"local-{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for r in reqs:
            self.add_request(r)
        while self.has_work():
            self.step()
        return reqs
