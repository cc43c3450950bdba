"""The benchmark's workload: Poisson arrivals (or a burst), a mix of short chat turns and
long documents, prompts built from a shipped list of chat prompts. Fixed seed: the same
config gives the same queries."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class WorkloadConfig:
    num_queries: int = 64
    rate_qps: float | None = 2.0          # Poisson arrival rate; None or inf = burst (all at t=0)
    seed: int = 0
    long_fraction: float = 0.3            # share of long-document queries
    short_prompt: tuple[int, int] = (16, 128)
    short_output: tuple[int, int] = (16, 128)
    long_prompt: tuple[int, int] = (256, 1024)
    long_output: tuple[int, int] = (32, 256)
    scale: float = 1.0                    # multiplies every length (--quick uses < 1)
    max_prompt_tokens: int = 4096
    max_output_tokens: int = 1024


@dataclass(frozen=True)
class Query:
    index: int
    arrival_s: float
    prompt_ids: list[int]
    max_new_tokens: int
    long: bool = False


def prompt_texts() -> list[str]:
    text = resources.files("deploy.bench").joinpath("prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _token_pool(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids += list(tokenizer.encode(t))
    return ids or [1]


def make_workload(cfg: WorkloadConfig, tokenizer=None, vocab_size: int | None = None) -> list[Query]:
    """Queries sorted by arrival. Without a tokenizer, prompt ids are drawn from [1, vocab_size)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_queries
    burst = cfg.rate_qps is None or math.isinf(cfg.rate_qps)
    arrivals = np.zeros(n) if burst else np.cumsum(rng.exponential(1.0 / cfg.rate_qps, n))
    is_long = rng.random(n) < cfg.long_fraction
    pool = _token_pool(tokenizer, prompt_texts()) if tokenizer is not None else None

    def draw(lo_hi, cap):
        lo, hi = (max(1, int(round(x * cfg.scale))) for x in lo_hi)
        return int(min(cap, rng.integers(lo, max(lo, hi) + 1)))
    queries = []
    for i in range(n):
        plen = draw(cfg.long_prompt if is_long[i] else cfg.short_prompt, cfg.max_prompt_tokens)
        olen = draw(cfg.long_output if is_long[i] else cfg.short_output, cfg.max_output_tokens)
        if pool is not None:  # a window of the chat text, exactly plen tokens
            start = int(rng.integers(0, len(pool)))
            ids = [pool[(start + k) % len(pool)] for k in range(plen)]
        else:
            ids = rng.integers(1, vocab_size or 256, plen).tolist()
        queries.append(Query(i, float(arrivals[i]), ids, olen, bool(is_long[i])))
    return queries


def load_tokenizer(name: str):
    """A local tokenizer for exact prompt lengths, or None (then a prompt's length is its word count)."""
    if name == "none":
        return None
    try:
        from transformers import AutoTokenizer
        if name == "smollm2":
            from baton.model_files import smollm2_dir
            name = smollm2_dir()
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure: fall back to words, say so
        print(f"bench: tokenizer {name!r} unavailable ({e}); prompt lengths are word counts", file=sys.stderr)
        return None
