"""The benchmark's baselines are honest: greedy tokens equal generate() for each query."""
import random

import torch

from baton.engine.runner import ModelRunner
from deploy.bench.baselines import PaddedPrefillRunner, SelectiveRunner
from tiny_model import EOS, reference_greedy


def _drive(tiny, make_step, remove, max_rows=4, n=10, seed=0):
    """Iteration-level loop: newcomers join at random steps, rows leave when done."""
    rng = random.Random(seed)
    queries = [([rng.randrange(1, EOS) for _ in range(rng.randint(1, 40))], rng.randint(1, 12)) for _ in range(n)]
    pending, rows, out = list(range(n)), [], {i: [] for i in range(n)}
    while pending or rows:
        newcomers = []
        while pending and len(rows) + len(newcomers) < max_rows and (not rows or rng.random() < 0.4):
            newcomers.append(pending.pop(0))
        logits = make_step(rows, newcomers, queries, out)
        rows = rows + newcomers
        for i, q in enumerate(rows):
            out[q].append(int(torch.argmax(logits[i])))
        for i in reversed(range(len(rows))):
            if len(out[rows[i]]) >= queries[rows[i]][1]:
                remove(rows, i)
    for i, (p, m) in enumerate(queries):
        assert out[i] == reference_greedy(tiny, p, m, ignore_eos=True), i


def test_padded_prefill_equals_generate(tiny):
    pr = PaddedPrefillRunner(ModelRunner(tiny.model), max_rows=4, cols=16)  # small: growth is exercised

    def step(rows, newcomers, queries, out):
        return pr.step([[out[q][-1]] for q in rows] + [queries[q][0] for q in newcomers])

    def remove(rows, i):
        moved = pr.remove(i)
        last = rows.pop()
        if moved is not None:
            rows[i] = last
    _drive(tiny, step, remove)
    assert pr.useful < pr.computed  # running rows computed padding while newcomers were prefilled


def test_selective_equals_generate(tiny):
    sr = SelectiveRunner(ModelRunner(tiny.model), max_len=256)

    def step(rows, newcomers, queries, out):
        return sr.step([(str(q), [out[q][-1]]) for q in rows] + [(str(q), queries[q][0]) for q in newcomers])

    def remove(rows, i):
        sr.remove(str(rows[i]))
        rows.pop(i)
    _drive(tiny, step, remove)
