"""The step-time budget (baton/engine/step_budget.py): prompt tokens per step sized from measured step
costs, and an engine whose budget changes every step still gives every query its exact tokens."""
from __future__ import annotations

import random

import pytest

from baton.engine import step_budget
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.step_budget import StepBudget
from baton.sampling import SamplingParams
from tiny_model import EOS, reference_greedy


def _learned(budget: StepBudget, rows: int = 8, decode_s: float = 0.1, token_s: float = 0.002) -> StepBudget:
    for _ in range(3):
        budget.observe(rows, 0, decode_s)
        budget.observe(rows, 100, decode_s + 100 * token_s)
    return budget


def test_a_step_with_prompt_pieces_is_sized_to_twice_the_measured_decode_step():
    budget = _learned(StepBudget(512))
    assert budget.tokens(8) == 50            # (2 x 0.1 s - 0.1 s) / 2 ms a token
    assert budget.tokens(7) == 50            # the same power-of-two bucket of rows
    assert budget.tokens(16) == 50           # a row count not measured yet borrows the nearest one measured
    budget.observe(8, 0, 0.2)                # one slow step (a pause of the machine) steers nothing
    assert budget.tokens(8) == 50
    for _ in range(5):                       # decode got slower for good (wider rows): the median follows
        budget.observe(8, 0, 0.2)
    assert budget.tokens(8) == 100           # (2 x 0.2 s - 0.2 s) / 2 ms


def test_a_first_steps_one_off_cost_does_not_shrink_the_budget():
    budget = StepBudget(512)
    budget.observe(0, 512, 5.4)              # the first step: the cache's pages touched for the first time
    budget.observe(8, 0, 0.1)
    budget.observe(8, 100, 0.3)
    budget.observe(8, 100, 0.3)
    assert budget.tokens(8) == 50


def test_when_more_prompts_wait_than_rows_run_the_waiting_get_the_step_in_proportion():
    budget = _learned(StepBudget(512))
    assert budget.tokens(8, starting=4) == 50      # fewer waiting than running: twice the decode step
    assert budget.tokens(8, starting=32) == 200    # (0.1 s x (1 + 32 / 8) - 0.1 s) / 2 ms a token
    assert budget.tokens(8, starting=400) == 512   # --max-num-batched-tokens still caps it


def test_the_whole_token_budget_while_learning_and_with_no_running_rows():
    assert StepBudget(512).tokens(8) == 512                      # nothing measured yet
    assert _learned(StepBudget(512)).tokens(0) == 512            # nobody waits for the step
    assert StepBudget(2048, target_ms=None).tokens(0, starting=1) == 2048


def test_without_a_time_budget_running_rows_get_a_quarter_of_the_tokens_and_a_burst_all_of_them():
    budget = StepBudget(2048, target_ms=None)
    assert budget.tokens(8) == budget.tokens(8, starting=8) == 512      # a steady trickle: a quarter
    assert budget.tokens(8, starting=16) == 1024                        # 16 waiting / (4 x 8 running)
    assert budget.tokens(1, starting=31) == budget.tokens(8, starting=100) == 2048   # a burst: all of it
    assert StepBudget(64, target_ms=None).tokens(8) == 32               # never under the floor


def test_a_fixed_step_time_within_the_floor_and_the_ceiling():
    assert _learned(StepBudget(512, target_ms=300)).tokens(8) == 100      # (0.3 - 0.1) / 0.002
    assert _learned(StepBudget(64, target_ms=300)).tokens(8) == 64        # --max-num-batched-tokens caps it
    assert _learned(StepBudget(512, target_ms=100)).tokens(8) == 32       # a prompt always moves
    assert _learned(StepBudget(16, target_ms=100)).tokens(8) == 16


def test_the_flag_values():
    assert step_budget.parse("auto") == 0.0 and step_budget.parse("off") is None
    assert step_budget.parse("150") == 150.0
    for bad in ("0", "-5", "inf", "nan", "fast"):
        with pytest.raises(ValueError):
            step_budget.parse(bad)


class _RandomBudget(StepBudget):
    """Any budget the policy could come up with, a different one every step."""

    def __init__(self, rng: random.Random):
        super().__init__(512)
        self.rng, self.seen = rng, []

    def tokens(self, rows: int, starting: int = 0) -> int:
        self.seen.append(self.rng.choice([1, 3, 16, 32, 77, 512]))
        return self.seen[-1]


def test_any_sequence_of_step_budgets_keeps_every_querys_greedy_tokens_exact(tiny):
    rng = random.Random(11)
    engine = Engine(tiny, EngineConfig(max_batch=4, prefix_cache_mb=0))
    engine.budget = _RandomBudget(rng)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 120))] for _ in range(9)]
    lengths = [rng.randint(1, 20) for _ in prompts]
    reqs = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
    assert [r.output_ids for r in reqs] == [reference_greedy(tiny, p, n, ignore_eos=True) for p, n in zip(prompts, lengths)]
    assert len(set(engine.budget.seen)) > 3


def test_the_engine_measures_what_its_steps_cost(tiny):
    engine = Engine(tiny, EngineConfig(max_batch=4, prefill_chunk_tokens=40, step_time_ms=0.0))   # auto
    rng = random.Random(5)
    engine.generate([[rng.randrange(1, EOS) for _ in range(100)] for _ in range(6)],
                    SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert engine.budget.decode_s and all(s > 0 for s in engine.budget.decode_s.values())
    assert engine.budget.token_s is not None and engine.budget.token_s > 0
    assert "step budget 2x the decode step" in engine.describe()
