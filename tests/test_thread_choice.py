"""`--threads auto`: a CPU worker times its decode step with 1, 2, 4 .. N threads and keeps the fewest
within 10 % of the fastest (baton/thread_choice.py). Which count wins depends on the machine, so the
tests check the rule on given times and that a real choice leaves the engine as it found it."""
from __future__ import annotations

import argparse

import pytest
import torch

from baton import thread_choice
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.sampling import SamplingParams


def test_the_flag_takes_a_count_auto_or_auto_with_a_ceiling():
    assert thread_choice.parse("3") == (False, 3)
    assert thread_choice.parse("auto") == (True, None)
    assert thread_choice.parse("auto:4") == (True, 4)
    for bad in ("0", "autox", "auto:0", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            thread_choice.parse(bad)


def test_candidates_are_powers_of_two_then_the_ceiling():
    assert thread_choice.candidates(1) == [1]
    assert thread_choice.candidates(2) == [1, 2]
    assert thread_choice.candidates(6) == [1, 2, 4, 6]
    assert thread_choice.candidates(8) == [1, 2, 4, 8]


def test_the_fewest_threads_that_more_do_not_beat_by_the_gain_win():
    assert thread_choice.fewest_paying({1: 1.0, 2: 0.5, 4: 0.48}, 1.25) == 2
    assert thread_choice.fewest_paying({1: 0.76, 2: 0.69}, 1.25) == 1        # the tiny model: 1.1x, not worth a core
    assert thread_choice.fewest_paying({1: 108.0, 2: 73.0}, 1.25) == 2       # SmolLM2: 1.48x
    assert thread_choice.fewest_paying({1: 0.1, 2: 3.0}, 1.25) == 1          # more is slower
    assert thread_choice.fewest_paying({1: 1.0, 2: 0.9, 4: 0.4}, 1.25) == 4  # 2 buys little, 4 a lot


def test_a_choice_sets_torch_threads_and_leaves_the_engine_idle_and_exact(tiny):
    engine = Engine(tiny, EngineConfig(max_batch=4))
    prompt, params = [5, 9, 14, 20], SamplingParams(max_new_tokens=6)
    before_tokens = engine.generate([prompt], params)[0].output_ids
    counts = dict(engine.counts)
    threads = torch.get_num_threads()
    try:
        chosen, note = thread_choice.choose(engine, 2)
        assert note.startswith(f"torch threads: {chosen} (decode step of 4 rows")
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
        assert not engine.has_work() and dict(engine.counts) == counts   # its requests are not the served ones
        assert engine.generate([prompt], params)[0].output_ids == before_tokens
    finally:
        torch.set_num_threads(threads)
