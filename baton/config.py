"""One frozen config per engine process, built from the CLI in one place."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"            # "smollm2" or a local Hugging Face model directory
    dtype: str = "float32"            # float32 | bfloat16 | float16 | float64
    device: str = "auto"              # auto = cuda when present, else cpu
    max_batch: int = 32               # rows of the running decode batch
    max_queue: int = 256              # accepted requests waiting for a row
    max_new_tokens_limit: int = 4096  # the largest max_new_tokens a request may ask for
    prefill_chunk_tokens: int = 512   # prompt tokens prefilled per step, in chunks (in-process / colocated)
    kv_col_chunk: int = 64            # cache columns preallocated at a time
    prefix_cache_mb: int = 256        # K/V of prompt prefixes kept for later prompts (baton/prefix_cache.py); 0 = off
