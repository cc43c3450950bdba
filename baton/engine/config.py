"""One frozen config per engine process, built from the CLI in one place. The model, its dtype and
device are not in it: they choose what is loaded (baton/model_loader.py), and the engine takes the
loaded model and reads them from it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32               # rows of the running decode batch
    max_queue: int = 256              # accepted requests waiting for a row
    prefill_chunk_tokens: int = 2048  # at most this many prompt tokens prefilled per step, in chunks (colocated);
                                      # a quarter beside running rows but in a burst (engine/step_budget.py)
    step_time_ms: float | None = None # None = prefill_chunk_tokens alone; > 0 = a step with prompt pieces
                                      # takes about this long; 0 = twice the decode step (engine/step_budget.py)
    prefix_cache_mb: int = 256        # K/V of prompt prefixes kept for later prompts (baton/engine/prefix_cache.py); 0 = off
    max_model_len: int = 0            # prompt + output tokens a request may hold; 0 = the model's max_position_embeddings
    kv_cache_memory: int = 0          # bytes for the decode batch's K/V, allocated once; 0 = sized by the policy below
    gpu_memory_utilization: float = 0.9   # on a GPU with kv_cache_memory 0: the share of the device the worker may fill
    enforce_eager: bool = False       # no CUDA graphs for the decode step (always eager on CPU)
