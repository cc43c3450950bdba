"""The static-buffer decode step (the eager twin of the CUDA graphs): a step padded to a batch-size
bucket writes nothing outside its rows, and a row's tokens do not depend on the bucket size."""
import random

import torch

from baton.engine.batch import DecodeBatch
from baton.engine.decode_graphs import buckets_for
from baton.engine.engine import Engine
from baton.engine.prefill import Prefiller
from baton.request import Request
from baton.sampling import SamplingParams
from tiny_model import EOS


def test_buckets_cover_every_batch_size():
    assert buckets_for(32) == [1, 2, 4, 8, 16, 24, 32]
    assert buckets_for(5) == [1, 2, 4, 5]
    b = buckets_for(256)
    assert b[-1] == 256 and all(x < y for x, y in zip(b, b[1:])) and 128 in b


def _requests(n, seed=3):
    rng = random.Random(seed)
    return [Request(f"q{i}", [rng.randrange(1, EOS) for _ in range(rng.randint(2, 40))],
                    SamplingParams(max_new_tokens=12, ignore_eos=True)) for i in range(n)]


def _run(tiny, prefiller, buckets, sentinel_rows=False):
    batch = DecodeBatch(prefiller.runner, tiny, max_batch=8, buckets=buckets)
    reqs = _requests(3)
    for r in reqs:
        batch.admit(r, prefiller.prefill(r.prompt_ids, r.params))
    if sentinel_rows:
        batch.cache.buf[:, :, 3:] = 7.0                  # rows no request holds
    while len(batch):
        batch.step()
    return batch, [r.output_ids for r in reqs]


def test_a_padded_step_writes_nothing_outside_its_rows(tiny):
    prefiller = Prefiller(Engine(tiny).runner)
    batch, _ = _run(tiny, prefiller, [8], sentinel_rows=True)   # 3 rows run as 8
    assert bool((batch.cache.buf[:, :, 3:] == 7.0).all())


def test_a_rows_tokens_are_the_same_in_every_bucket_size(tiny):
    prefiller = Prefiller(Engine(tiny).runner)
    outs = [_run(tiny, prefiller, buckets)[1] for buckets in (None, [3], [4], [8])]
    assert all(o == outs[0] for o in outs[1:])
    assert all(len(ids) == 12 for ids in outs[0])
