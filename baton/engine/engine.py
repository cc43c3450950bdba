"""The in-process BATON engine: prefill newcomers on their own, embed their K/V in the running batch.

Two halves that the services use separately (prefill worker, decode worker) and that `Engine`
drives together in one process: prefill.py's `Prefiller` (one query alone -> its first token and
K/V) and batch.py's `DecodeBatch` (the running batch). In one process (`Engine`, the colocated
worker) newcomers' prompts are prefilled in chunks inside the decode step's pass over the
weights, under a per-step budget (step_budget.py, chunked prefill): a burst neither stalls the
running rows nor queues behind one long prompt.
"""
from __future__ import annotations

import collections
import time

import torch

from baton.engine.batch import DecodeBatch, default_capacity
from baton.engine.config import EngineConfig
from baton.engine.prefill import Prefiller, PrefillOutput
from baton.engine.prefix_cache import PrefixCache
from baton.engine.runner import ModelRunner, PromptChunk
from baton.engine.scheduler import Scheduler
from baton.engine.step_budget import StepBudget
from baton.errors import InvalidArgument
from baton.model_loader import LoadedModel
from baton.request import FinishReason, Request, Status, TokenEvent
from baton.sampling import SamplingParams


class Engine:
    """Prefill and decode in one process: newcomers are prefilled in chunks inside the decode
    step's pass, then embedded by vector shaping; K/V prefilled elsewhere joins between steps.
    A step is plan (baton/engine/scheduler.py, no model) -> run (the batch) -> finish: every request
    leaves through `finish_and_free`, which frees what it held and counts how it ended."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        self.runner = ModelRunner(model.model, model.gguf)
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
        return (f"{self.capacity.describe()}; {self.runner.describe()}; {self.batch.decode.describe()}; "
                f"{self.budget.describe()}")

    @property
    def max_len(self) -> int:
        """Prompt + output tokens a request may reach here (the model's context, or less if the
        cache's budget or --max-model-len says so)."""
        return self.batch.max_len

    def _check_new(self, req: Request) -> None:
        self.scheduler.check_room()
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        if req.num_tokens >= self.max_len:
            raise InvalidArgument(f"{req.num_tokens} tokens do not fit the context of {self.max_len}", field="prompt")

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
            self.finish_and_free(req, Status.CANCELLED, None)
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
