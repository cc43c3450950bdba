"""Per-row token choice.

A sampled token depends only on its row's logits, its parameters and (seed, index of the
token): each token draws from a generator seeded by both, so a query's text is the same
whatever its batch-mates, and wherever (prefill or decode worker) the token is drawn.
"""
from __future__ import annotations

import torch

from baton.sampling import SamplingParams


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
