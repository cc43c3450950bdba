"""Prompts that start alike prefill only what differs (baton/engine/prefix_cache.py), and get exactly the
tokens they get without the cache: generate()'s, in the engine's chunked prefill and in the
prefill worker's whole-prompt pass (tiny random Llama, float64)."""
from __future__ import annotations

import random

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.prefill import Prefiller
from baton.engine.prefix_cache import BLOCK, PrefixCache
from baton.request import Request
from baton.sampling import SamplingParams
from tiny_model import EOS, reference_greedy


class _Runner:
    """What the cache asks of a model runner: a prompt's K/V buffer (L=1, 2, Hkv=1, P, D=1)."""

    @staticmethod
    def new_kv(n: int) -> torch.Tensor:
        return torch.full((1, 2, 1, n, 1), -1.0)


def _kv(ids) -> torch.Tensor:
    """A stand-in K/V whose column i is token i: what was copied shows which tokens it came from."""
    return torch.tensor(ids, dtype=torch.float).view(1, 1, 1, -1, 1).expand(1, 2, 1, -1, 1).clone()


def test_the_longest_block_aligned_prefix_is_copied_and_one_token_is_always_left_to_compute():
    cache = PrefixCache(1 << 20)
    system = list(range(100, 140))                          # 40 tokens: two whole blocks and 8 more
    cache.add(system + [1, 2, 3], _kv(system + [1, 2, 3]))
    kv, cached = cache.new_kv(_Runner, system + [7, 8])
    assert cached == 2 * BLOCK and kv[0, 0, 0, :cached, 0].tolist() == system[:cached]
    assert (kv[..., cached:, :] == -1).all()               # the rest is left to compute
    exact = list(range(200, 200 + 2 * BLOCK))
    cache.add(exact, _kv(exact))
    assert cache.match(exact)[0] == BLOCK                   # the same prompt again: its last token's logits are wanted
    assert cache.match(list(range(300, 340)))[0] == 0       # nothing alike
    assert cache.hit_tokens == 3 * BLOCK


def test_a_hash_match_is_checked_token_for_token(monkeypatch):
    import baton.engine.prefix_cache as pc
    cache = PrefixCache(1 << 20)
    monkeypatch.setattr(pc, "_block_hashes", lambda ids, n: [0] * (n // BLOCK))   # every prefix collides
    a = list(range(2 * BLOCK + 1))
    cache.add(a, _kv(a))
    assert cache.match(a)[0] == 2 * BLOCK
    assert cache.match([9] * (2 * BLOCK + 1))[0] == 0


def test_the_oldest_entries_go_first_past_the_byte_budget_and_a_prompt_cached_whole_is_not_stored_twice():
    one = _kv(range(2 * BLOCK)).numel() * 4                 # bytes of one 2-block entry
    cache = PrefixCache(2 * one)
    prompts = [[k] * (2 * BLOCK) for k in (1, 2, 3)]
    for p in prompts[:2]:
        cache.add(p, _kv(p))
    cache.add(prompts[0], _kv(prompts[0]))                  # already whole in the cache: kept once, now newest
    assert len(cache.entries) == 2 and cache.bytes == 2 * one
    cache.add(prompts[2], _kv(prompts[2]))                  # evicts prompts[1], the least recently used
    assert [cache.match(p + [0])[0] for p in prompts] == [2 * BLOCK, 0, 2 * BLOCK]
    off = PrefixCache(0)
    assert off.match(prompts[0] + [0]) == (0, None) and off.queried_tokens == 0   # off: nothing looked up


def test_prompts_sharing_a_system_prompt_get_generates_tokens_in_the_engine_and_skip_its_prefill(tiny):
    rng = random.Random(5)
    system = [rng.randrange(1, EOS) for _ in range(3 * BLOCK + 5)]
    prompts = [system + [rng.randrange(1, EOS) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    prompts.append(list(prompts[0]))                        # the same prompt again
    # Small prefill chunks, 2 rows: prompts start at different steps, some after others were cached.
    engine = Engine(tiny, EngineConfig(max_batch=2, max_queue=16, prefill_chunk_tokens=24))
    done = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for r, p in zip(done, prompts):
        assert r.output_ids == reference_greedy(tiny, p, 12, ignore_eos=True), r.request_id
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] >= 5 * 3 * BLOCK and stats["prefix_cache_bytes"] > 0


def test_the_prefill_workers_pass_uses_the_cache_and_gives_the_same_first_token_and_kv(tiny):
    rng = random.Random(6)
    system = [rng.randrange(1, EOS) for _ in range(2 * BLOCK + 3)]
    reqs = [Request(f"q{i}", system + [rng.randrange(1, EOS) for _ in range(4)], SamplingParams(max_new_tokens=4))
            for i in range(3)]
    runner = Engine(tiny).runner
    plain = Prefiller(runner).prefill_many(reqs)
    cached = Prefiller(runner, prefixes=PrefixCache(1 << 20))
    cached.prefill_many(reqs[:1])
    outs = cached.prefill_many(reqs[1:])                   # both find the system prompt's two blocks
    assert cached.prefixes.hit_tokens == 2 * 2 * BLOCK
    for a, b in zip(plain[1:], outs):
        assert a.token_id == b.token_id and torch.allclose(a.kv, b.kv, rtol=0, atol=1e-12)
