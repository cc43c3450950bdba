"""Seeded sampling is independent of batch-mates; parameters are validated."""
import dataclasses
import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.sampler import sample_one
from baton.sampling import SamplingParams
from tiny_model import EOS


def test_seeded_sampling_alone_equals_in_busy_batch(tiny):
    rng = random.Random(3)
    target = [rng.randrange(1, EOS) for _ in range(17)]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    alone = Engine(tiny).generate([target], params)[0].output_ids
    others = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 90))] for _ in range(7)]
    other_params = [SamplingParams(max_new_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 1.3]),
                                   seed=rng.randrange(1000)) for _ in others]
    busy = Engine(tiny, EngineConfig(max_batch=4)).generate(others[:3] + [target] + others[3:],
                                                           other_params[:3] + [params] + other_params[3:])
    assert busy[3].output_ids == alone
    again = Engine(tiny).generate([target], dataclasses.replace(params, seed=43))[0].output_ids
    assert again != alone  # the seed matters


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0], dtype=torch.float64)
    for i in range(20):
        assert sample_one(logits, SamplingParams(temperature=1.0, top_k=1, seed=i), i) == 1
        assert sample_one(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=i), i) == 1
        assert sample_one(logits, SamplingParams(temperature=5.0, top_k=2, seed=i), i) in (1, 2)


def test_min_p_keeps_tokens_within_its_share_of_the_top_one():
    # probabilities ~ (0.03, 0.51, 0.46, 0.01): token 2 is 0.905 x the top token
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0], dtype=torch.float64)
    assert {sample_one(logits, SamplingParams(temperature=1.0, min_p=0.95, seed=i), i) for i in range(30)} == {1}
    assert {sample_one(logits, SamplingParams(temperature=1.0, min_p=0.5, seed=i), i) for i in range(60)} == {1, 2}
    assert {sample_one(logits, SamplingParams(temperature=1.0, min_p=0.0, seed=i), i) for i in range(200)} > {1, 2}


@pytest.mark.parametrize("kw, field", [
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(stop=("",)), "stop"), (dict(temperature=float("nan")), "temperature")])
def test_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw).validate()


def _row(params, output=(), prompt=(1, 2)):
    from types import SimpleNamespace
    return SimpleNamespace(params=params, prompt_ids=list(prompt), output_ids=list(output), sampler_state=None,
                           grammar_state=None)


def test_a_batch_is_sampled_at_once_as_each_row_alone():
    """The batched sampler: every row of a mixed batch (greedy, top-k, top-p, min-p, penalties, bias,
    min_tokens) gets the token and logprobs it gets alone."""
    from baton.engine.sampler import sample_rows
    torch.manual_seed(0)
    logits = torch.randn(7, 50, dtype=torch.float64) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=1),
              SamplingParams(temperature=1.2, top_p=0.7, seed=2, logprobs=3),
              SamplingParams(temperature=1.0, min_p=0.2, seed=3), SamplingParams(repetition_penalty=1.3, logprobs=0),
              SamplingParams(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.4, logit_bias=((7, 5.0),), seed=4),
              SamplingParams(min_tokens=3, seed=5, temperature=1.0)]
    rows = lambda: [_row(p, output=[3, 4, 4], prompt=[1, 9]) if i != 6 else _row(p) for i, p in enumerate(params)]
    together = sample_rows(logits, rows(), eos_ids={int(logits[6].argmax())})
    alone = [sample_rows(logits[i:i + 1], [r], eos_ids={int(logits[6].argmax())})[0] for i, r in enumerate(rows())]
    assert together == alone
    assert together[0][0] == int(logits[0].argmax()) and together[6][0] != int(logits[6].argmax())
    assert together[2][1] is not None and len(together[2][1].top) == 3


def test_the_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    picks = [sample_one(probs.log(), SamplingParams(temperature=1.0, seed=9), i) for i in range(3000)]
    share = [picks.count(t) / len(picks) for t in range(4)]
    assert all(abs(s - p) < 0.04 for s, p in zip(share, probs.tolist())) and share[3] == 0
