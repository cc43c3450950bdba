"""The seven systems of the benchmark, each replaying one workload in real time.

Every system takes queries as they arrive (`arrival_s` after the start), streams or
returns their tokens, and reports, per query, the time of each output token. In-process
systems are driven by one loop: admit what has arrived, run one iteration.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from baton.engine.batch import DecodeBatch
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.request import Request
from baton.sampling import SamplingParams
from deploy.bench.baselines import PaddedPrefillRunner, SelectiveRunner


@dataclass
class RunResult:
    token_times: dict[int, list[float]]          # query index -> absolute time of each output token (s)
    start: float                                 # time.monotonic() of t=0 of the workload
    idle_token_fraction: float = 0.0
    extra: dict = field(default_factory=dict)


def _params(q) -> SamplingParams:
    return SamplingParams(max_new_tokens=q.max_new_tokens, ignore_eos=True, seed=q.index)


class IterationSystem:
    """Base of the in-process systems: add(), step() -> [(query index, token)], busy()."""
    name = "?"

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.computed = self.useful = 0

    def idle_fraction(self) -> float:
        return 1.0 - self.useful / self.computed if self.computed else 0.0

    def run(self, queries, progress=None) -> RunResult:
        pending = collections.deque(sorted(queries, key=lambda q: q.arrival_s))
        times: dict[int, list[float]] = {q.index: [] for q in queries}
        start = time.monotonic()
        done = 0
        while pending or self.busy():
            now = time.monotonic() - start
            while pending and pending[0].arrival_s <= now:
                self.add(pending.popleft())
            if not self.busy():
                time.sleep(max(0.0, min(0.05, pending[0].arrival_s - now)))
                continue
            for idx, _tok in self.step():
                times[idx].append(time.monotonic())
                if len(times[idx]) == self._max_new[idx]:
                    done += 1
                    if progress:
                        progress(self.name, done, len(queries))
        return RunResult(times, start, self.idle_fraction())

    def add(self, q) -> None:
        raise NotImplementedError

    def step(self):
        raise NotImplementedError

    def busy(self) -> bool:
        raise NotImplementedError


class BatonSystem(IterationSystem):
    """BATON in-process: newcomers prefilled alone, their K/V embedded into the running batch."""
    name = "baton"

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.engine = Engine(model, EngineConfig(max_batch=max_batch, max_queue=1 << 20))
        self._max_new, self._index = {}, {}

    def add(self, q) -> None:
        self._max_new[q.index] = q.max_new_tokens
        self._index[f"q{q.index}"] = q.index
        self.engine.add_request(Request(f"q{q.index}", list(q.prompt_ids), _params(q)))

    def step(self):
        # Every row computes one token, but attends over the batch's common width: the columns
        # left of a shorter row's K/V are padding (masked, computed all the same).
        cache = self.engine.batch.cache
        self.computed += cache.num_rows * cache.width
        self.useful += sum(cache.lens)
        events = self.engine.step()
        return [(self._index[e.request_id], e.token_id) for e in events]

    def busy(self) -> bool:
        return self.engine.has_work()


class StaticSystem(IterationSystem):
    """Run-to-completion: a batch forms from what waits, and runs until its longest query ends;
    finished rows keep computing (idle) and newcomers wait for the next batch."""
    name = "static"

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.engine = Engine(model, EngineConfig(max_batch=max_batch))
        self.prefiller = self.engine.prefiller
        self.waiting: collections.deque = collections.deque()
        self.batch: DecodeBatch | None = None
        self.own: dict[str, tuple[int, int]] = {}   # request id -> (query index, its own token count)
        self._max_new = {}

    def add(self, q) -> None:
        self._max_new[q.index] = q.max_new_tokens
        self.waiting.append(q)

    def busy(self) -> bool:
        return bool(self.waiting) or (self.batch is not None and len(self.batch) > 0)

    def step(self):
        out = []
        if self.batch is None or len(self.batch) == 0:
            group = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
            longest = max(q.max_new_tokens for q in group)
            self.batch = DecodeBatch(self.engine.runner, self.model, self.max_batch, self.engine.capacity)
            for q in group:
                req = Request(f"q{q.index}", list(q.prompt_ids),
                              SamplingParams(max_new_tokens=longest, ignore_eos=True, seed=q.index))
                self.own[req.request_id] = (q.index, q.max_new_tokens)
                for e in self.batch.admit(req, self.prefiller.prefill(req.prompt_ids, req.params)):
                    out.append(e)
        else:
            n = len(self.batch)
            live = sum(1 for r in self.batch.rows if len(r.output_ids) < self.own[r.request_id][1])
            out = self.batch.step()
            self.computed += n
            self.useful += live
        return [(self.own[e.request_id][0], e.token_id) for e in out if e.index < self.own[e.request_id][1]]


class _IterationLevel(IterationSystem):
    """Shared loop of the two iteration-level baselines: newcomers are prefilled in the step."""

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.engine = Engine(model)                      # only for its runner
        self.waiting: collections.deque = collections.deque()
        self.rows: list = []                             # queries in the batch, row order
        self.out: dict[int, list[int]] = {}
        self._max_new = {}

    def add(self, q) -> None:
        self._max_new[q.index] = q.max_new_tokens
        self.waiting.append(q)

    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.rows)

    def step(self):
        newcomers = [self.waiting.popleft() for _ in range(min(self.max_batch - len(self.rows), len(self.waiting)))]
        logits = self._forward(newcomers)
        self.rows += newcomers
        tokens = torch.argmax(logits, dim=-1).tolist()
        events = []
        for q, t in zip(self.rows, tokens):
            self.out.setdefault(q.index, []).append(t)
            events.append((q.index, t))
        for i in reversed(range(len(self.rows))):
            q = self.rows[i]
            if len(self.out[q.index]) >= q.max_new_tokens:
                self._remove(i)
        return events


class PaddedPrefillSystem(_IterationLevel):
    name = "padded_prefill"

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.pr = PaddedPrefillRunner(self.engine.runner, max_batch)

    def _forward(self, newcomers):
        chunks = [[self.out[q.index][-1]] for q in self.rows] + [list(q.prompt_ids) for q in newcomers]
        logits = self.pr.step(chunks)
        self.computed, self.useful = self.pr.computed, self.pr.useful
        return logits

    def _remove(self, i):
        moved = self.pr.remove(i)
        last = self.rows.pop()
        if moved is not None:
            self.rows[i] = last


class OrcaSystem(_IterationLevel):
    name = "orca"

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.sr = SelectiveRunner(self.engine.runner, model.max_len)

    def _forward(self, newcomers):
        for q in newcomers:
            self.sr.reserve(q.index, len(q.prompt_ids) + q.max_new_tokens)
        work = [(q.index, [self.out[q.index][-1]]) for q in self.rows] + [(q.index, list(q.prompt_ids)) for q in newcomers]
        n = sum(len(t) for _, t in work)
        self.computed += n
        self.useful += n
        return self.sr.step(work)

    def _remove(self, i):
        self.sr.remove(self.rows.pop(i).index)


class HFStaticSystem(IterationSystem):
    """transformers generate() on left-padded batches of what has arrived, run to completion."""
    name = "hf_static"

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self.waiting: collections.deque = collections.deque()
        self._max_new = {}
        self.pad = model.model.config.pad_token_id if model.model.config.pad_token_id is not None else 0

    def add(self, q) -> None:
        self._max_new[q.index] = q.max_new_tokens
        self.waiting.append(q)

    def busy(self) -> bool:
        return bool(self.waiting)

    def step(self) -> None:
        from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
        group = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        longest, width = max(q.max_new_tokens for q in group), max(len(q.prompt_ids) for q in group)
        ids = torch.full((len(group), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(group):
            ids[i, width - len(q.prompt_ids):] = torch.tensor(q.prompt_ids)
            mask[i, width - len(q.prompt_ids):] = 1
        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.monotonic())   # token k of every row exists from here on
                return scores
        dev = self.model.model.device
        # min_new_tokens: the workload ignores EOS, as every other system does.
        cfg = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=self.pad)
        with torch.no_grad():
            self.model.model.generate(ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg,
                                      logits_processor=LogitsProcessorList([Stamp()]))
        self.computed += len(group) * (width + longest)
        self.useful += sum(len(q.prompt_ids) + q.max_new_tokens for q in group)
        self._stamps = stamps

    def run(self, queries, progress=None) -> RunResult:
        # generate() returns whole batches; token k's time is the batch's k-th step.
        pending = collections.deque(sorted(queries, key=lambda q: q.arrival_s))
        times: dict[int, list[float]] = {q.index: [] for q in queries}
        start, done = time.monotonic(), 0
        while pending or self.waiting:
            now = time.monotonic() - start
            while pending and pending[0].arrival_s <= now:
                self.add(pending.popleft())
            if not self.waiting:
                time.sleep(max(0.0, min(0.05, pending[0].arrival_s - now)))
                continue
            group = list(self.waiting)[:self.max_batch]
            self.step()
            for q in group:
                times[q.index] = self._stamps[:q.max_new_tokens]
                done += 1
                if progress:
                    progress(self.name, done, len(queries))
        return RunResult(times, start, self.idle_fraction())


class HFContinuousSystem:
    """transformers' continuous batching manager (generate_batch's engine), fed as queries arrive."""
    name = "hf_continuous"

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch

    def run(self, queries, progress=None) -> RunResult:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        m = self.model.model
        cfg = GenerationConfig(max_new_tokens=max(q.max_new_tokens for q in queries), do_sample=False,
                               eos_token_id=-1, pad_token_id=0)
        # The cache sized as every other system's: max_batch rows of the longest query, 512 tokens a
        # step (baton's prefill budget). Left to infer it, transformers sizes it from the machine's
        # memory, which on a CPU host takes seconds to allocate and is not what the others get.
        longest = max(len(q.prompt_ids) + q.max_new_tokens for q in queries)
        page = ContinuousBatchingConfig().page_size
        cb = ContinuousBatchingConfig(num_blocks=self.max_batch * -(-longest // page) + 1, max_batch_tokens=512,
                                      max_requests_per_batch=self.max_batch)
        times: dict[int, list[float]] = {q.index: [] for q in queries}
        pending = sorted(queries, key=lambda q: q.arrival_s)
        with torch.no_grad(), m.continuous_batching_context_manager(generation_config=cfg, continuous_batching_config=cb,
                                                                    block=True, timeout=10) as manager:
            start, done, seen = time.monotonic(), 0, {}
            stop = threading.Event()

            def feed():
                for q in pending:
                    delay = q.arrival_s - (time.monotonic() - start)
                    if delay > 0 and stop.wait(delay):
                        return
                    manager.add_request(list(q.prompt_ids), request_id=f"q{q.index}", max_new_tokens=q.max_new_tokens,
                                        streaming=True, eos_token_id=-1)
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            deadline = time.monotonic() + 3600
            while done < len(queries) and time.monotonic() < deadline:
                r = manager.get_result(timeout=0.5)
                if r is None:
                    continue
                idx = int(r.request_id[1:])
                n = len(r.generated_tokens)
                now = time.monotonic()
                times[idx].extend([now] * (n - seen.get(idx, 0)))
                seen[idx] = n
                if r.is_finished():
                    done += 1
                    if progress:
                        progress(self.name, done, len(queries))
            stop.set()
        return RunResult(times, start, 0.0)


IN_PROCESS = {s.name: s for s in (StaticSystem, PaddedPrefillSystem, OrcaSystem, BatonSystem, HFStaticSystem,
                                  HFContinuousSystem)}
