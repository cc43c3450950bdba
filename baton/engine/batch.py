"""The running batch: `admit` a prefilled query between two steps, `step` decodes one token for
every row, finished or aborted rows leave at once. Which request holds which row is recorded
once, in its cache (cache.py `BatchKVCache`: join, leave, the step's inputs); the batch addresses
rows by request id only. A step with no prompt piece runs decode_graphs.py's static-buffer step
(CUDA graphs on a GPU)."""
from __future__ import annotations

import torch

from baton.detokenizer import IncrementalDetokenizer
from baton.engine.cache import BatchKVCache, KVCapacity, kv_capacity, token_bytes
from baton.engine.config import EngineConfig
from baton.engine.decode_graphs import DecodeGraphs
from baton.engine.prefill import PrefillOutput
from baton.engine.runner import ModelRunner, PromptChunk
from baton.engine.sampler import sample_rows
from baton.model_loader import LoadedModel
from baton.request import Request, Status, TokenEvent


def default_capacity(r: ModelRunner, model: LoadedModel, rows: int, config: EngineConfig = EngineConfig()) -> KVCapacity:
    """The batch cache's size from the config's memory budget and context cap (baton/engine/cache.py)."""
    return kv_capacity(rows, token_bytes(r.num_layers, r.num_kv_heads, r.head_dim, r.dtype), model.max_len,
                       max_model_len=config.max_model_len, budget=config.kv_cache_memory, device=r.device,
                       gpu_memory_utilization=config.gpu_memory_utilization)


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
            req.finish(Status.CANCELLED, None)
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
