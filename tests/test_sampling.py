"""Seeded sampling is independent of batch-mates; parameters are validated."""
import random

import pytest
import torch

from baton.config import EngineConfig
from baton.engine import Engine
from baton.sampler import sample_one
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
    again = Engine(tiny).generate([target], SamplingParams(**{**params.__dict__, "seed": 43}))[0].output_ids
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
