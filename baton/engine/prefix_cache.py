"""Prompt prefixes whose K/V was computed already, so a new prompt that starts the same way (a
system prompt, a chat's earlier turns, a few-shot preamble) prefills only the rest.

Keys are block-aligned prefixes of token ids (`BLOCK` tokens a block), chained so that looking up
a prompt costs one hash per block: the entry of a finished prompt is found from any of its block
boundaries, and the longest match wins. A hit is checked token for token (no trust in hashes).
An entry is the prompt's own K/V buffer, kept by reference once the prompt joined the batch (the
batch copies it), so caching copies nothing; the oldest entries go first past `max_bytes`.

The K/V of a prefix depends on its tokens alone (causal attention), so a prompt gets the tokens it
would get without the cache, as it does whatever chunks its prefill is cut into.
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 16   # prefix lengths that can match are multiples of this many tokens


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: torch.Tensor                                  # (L, 2, Hkv, P, D) holding at least len(ids) tokens
    keys: list[int] = field(default_factory=list)     # its block hashes in the index

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _block_hashes(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Hash of each block-aligned prefix of ids up to max_tokens: [h(ids[:16]), h(ids[:32]), ...]."""
    out, h = [], 0
    for end in range(BLOCK, max_tokens + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK:end])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()   # id -> entry, oldest first
        self.index: dict[int, int] = {}     # block hash -> id of the newest entry holding that prefix
        self.bytes = 0
        self._next_id = itertools.count()
        self.queried_tokens = 0             # prompt tokens looked up
        self.hit_tokens = 0                 # of which found here

    def match(self, ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """(k, kv): the longest cached prefix of ids that leaves at least one token to compute (the
        last one's logits are wanted), k a multiple of BLOCK; kv[..., :k, :] holds its K/V. (0, None) if none."""
        if not self.max_bytes:   # off: nothing is looked up (the stats say so)
            return 0, None
        self.queried_tokens += len(ids)
        hashes = _block_hashes(ids, len(ids) - 1)
        for n in range(len(hashes), 0, -1):
            key = self.index.get(hashes[n - 1])
            entry = self.entries.get(key) if key is not None else None
            k = n * BLOCK
            if entry is not None and entry.ids[:k] == tuple(ids[:k]):
                self.entries.move_to_end(key)
                self.hit_tokens += k
                return k, entry.kv
        return 0, None

    def new_kv(self, runner, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """A prompt's own K/V buffer (`runner.new_kv`) with its longest cached prefix copied in,
        and that prefix's length (0 when none): the prompt's prefill starts there."""
        kv = runner.new_kv(len(ids))                  # (L, 2, Hkv, P, D)
        cached, held = self.match(ids)
        if cached:
            kv[:, :, :, :cached] = held[:, :, :, :cached]
        return kv, cached

    def add(self, ids: Sequence[int], kv: torch.Tensor) -> None:
        """Keep a prompt's K/V (L, 2, Hkv, P >= len(ids), D) for later prompts that start like it."""
        hashes = _block_hashes(ids, len(ids))
        if not hashes or not self.max_bytes:
            return
        held = self.entries.get(self.index.get(hashes[-1], -1))
        if held is not None and held.ids[:len(hashes) * BLOCK] == tuple(ids[:len(hashes) * BLOCK]):
            self.entries.move_to_end(self.index[hashes[-1]])   # every block of it is cached already
            return
        entry = _Entry(tuple(ids), kv, hashes)
        if entry.nbytes > self.max_bytes:
            return
        key = next(self._next_id)
        self.entries[key] = entry
        self.bytes += entry.nbytes
        for h in hashes:
            self.index[h] = key
        while self.bytes > self.max_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, entry = self.entries.popitem(last=False)
        self.bytes -= entry.nbytes
        for h in entry.keys:
            if self.index.get(h) == key:
                del self.index[h]

    def stats(self) -> dict:
        return {"prefix_cache_bytes": self.bytes, "prefix_cache_queried_tokens": self.queried_tokens,
                "prefix_cache_hit_tokens": self.hit_tokens}
