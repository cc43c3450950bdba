"""Sampling parameters and per-row token choice.

A sampled token depends only on its row's logits, its parameters and (seed, index of the
token): each token draws from a generator seeded by both, so a query's text is the same
whatever its batch-mates, and wherever (prefill or decode worker) the token is drawn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = off
    seed: int = field(default_factory=lambda: random.getrandbits(63))
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


def _token_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (2 ** 63))
    return g


def sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """logits (V,) -> token id; `index` is the position of this token in the output."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the first token always
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    g = _token_generator(params.seed, index, logits.device)
    return int(torch.multinomial(probs, 1, generator=g))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """logits (n, V) -> n token ids. Greedy rows share one argmax."""
    out = torch.argmax(logits, dim=-1).tolist()
    for r, p in enumerate(params):
        if not p.greedy:
            out[r] = sample_one(logits[r], p, indices[r])
    return out
