"""Every query's greedy tokens equal transformers' generate() for that query alone,
however queries join and leave the running batch and whatever batch size a step is padded to
(tiny random Llama, float64)."""
import random

import pytest

from baton.engine.batch import DecodeBatch
from baton.engine.cache import KVCapacity
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.prefill import Prefiller
from baton.request import FinishReason, Request, Status
from baton.sampling import SamplingParams
from tiny_model import EOS, reference_greedy


def _prompt(rng, n):
    return [rng.randrange(1, EOS) for _ in range(n)]


def test_random_joins_cancels_widening_and_trimming(tiny):
    rng = random.Random(1234)
    prefiller = Prefiller(Engine(tiny).runner)
    # A cache of 240 columns for rows of up to 224 tokens: its window is moved back often (compaction);
    # steps padded to batch sizes 2, 5 or 12, as CUDA graph buckets are: padding rows write nothing.
    batch = DecodeBatch(prefiller.runner, tiny, max_batch=12, capacity=KVCapacity(12, 240, 230, 0), buckets=[2, 5, 12])
    lengths = [rng.randint(1, 200) for _ in range(34)]
    pending = [Request(f"q{i}", _prompt(rng, n), SamplingParams(max_new_tokens=rng.randint(1, 24), ignore_eos=True))
               for i, n in enumerate(lengths)]
    # Shape the scenario: a short batch, then a newcomer longer than every running row (widening),
    # which is also the row that leaves first (trimming).
    pending[0].prompt_ids, pending[1].prompt_ids = _prompt(rng, 5), _prompt(rng, 7)
    pending[0].params = pending[1].params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    pending[2].prompt_ids, pending[2].params = _prompt(rng, 200), SamplingParams(max_new_tokens=3, ignore_eos=True)
    cancel_at = {f"q{i}": rng.randint(1, 6) for i in rng.sample(range(3, 34), 6)}
    done, widened, trimmed, steps = [], False, False, 0
    while (pending or len(batch)) and steps < 2000:
        steps += 1
        # Join at random steps (the first three join in order to shape the scenario).
        while pending and not batch.full and (steps < 4 or rng.random() < 0.35):
            req = pending.pop(0)
            width = batch.cache.width
            batch.admit(req, prefiller.prefill(req.prompt_ids, req.params))
            widened |= len(batch) > 1 and req.status is Status.RUNNING and len(req.prompt_ids) > width
            if req.done:
                done.append(req)
            if steps < 4:
                break
        for rid, at in list(cancel_at.items()):
            req = batch.get(rid)
            if req is not None and len(req.output_ids) >= at:
                done.append(batch.abort(rid))
                del cancel_at[rid]
        width, running = batch.cache.width, list(batch.rows)
        batch.step()
        finished = [r for r in running if r.done]
        done += finished
        # Trimming: the longest row left and the batch got narrower than one step wider.
        trimmed |= len(batch) > 0 and batch.cache.width < width + 1
    assert not pending and len(batch) == 0, "the batch did not drain"
    assert widened and trimmed and batch.cache.compactions > 0
    cancelled = [r for r in done if r.status is Status.CANCELLED]
    finished = [r for r in done if r.status is Status.FINISHED]
    assert len(cancelled) >= 4 and len(finished) >= 25
    for r in finished:
        assert r.output_ids == reference_greedy(tiny, r.prompt_ids, r.params.max_new_tokens, ignore_eos=True), r.request_id
    for r in cancelled:  # a cancelled query's tokens so far are a prefix of its reference
        ref = reference_greedy(tiny, r.prompt_ids, len(r.output_ids), ignore_eos=True)
        assert r.output_ids == ref and r.finish_reason is None   # cancelled: no finish reason of the proto's


def test_engine_queue_and_eos(tiny):
    """The in-process engine: more queries than rows wait in the queue; EOS ends a query."""
    rng = random.Random(7)
    eng = Engine(tiny, EngineConfig(max_batch=4, prefill_chunk_tokens=64))
    prompts = [_prompt(rng, rng.randint(1, 80)) for _ in range(10)]
    mx = [rng.randint(1, 30) for _ in prompts]
    reqs = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in mx])
    for r, p, n in zip(reqs, prompts, mx):
        ref = reference_greedy(tiny, p, n)
        assert r.output_ids == ref
        assert r.finish_reason is (FinishReason.STOP if ref[-1] == EOS and len(ref) <= n else FinishReason.LENGTH)
    assert len(eng.batch) == 0 and eng.num_waiting == 0 and not eng.requests


def test_queue_full_and_duplicates(tiny):
    from baton.engine.scheduler import QueueFull
    eng = Engine(tiny, EngineConfig(max_batch=2, max_queue=2))
    eng.add_request(Request("a", [1, 2], SamplingParams()))
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request(Request("a", [1, 2], SamplingParams()))
    eng.add_request(Request("b", [1, 2], SamplingParams()))
    with pytest.raises(QueueFull):
        eng.add_request(Request("c", [1, 2], SamplingParams()))
    assert eng.abort("a") and not eng.abort("zzz")


def test_rows_leaving_in_any_order_leave_the_others_tokens_unchanged(tiny):
    """Six rows decode together; in each run they leave in another order (one every other step, so
    the last row moves into each hole in turn and the window is trimmed): every row's tokens up to
    its leaving equal its tokens in a run where none leaves."""
    rng = random.Random(99)
    prefiller = Prefiller(Engine(tiny).runner)
    prompts = [_prompt(rng, n) for n in (3, 40, 9, 25, 1, 17)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prefilled = [prefiller.prefill(p, params) for p in prompts]

    def run(order):
        batch = DecodeBatch(prefiller.runner, tiny, max_batch=6, buckets=[4, 6])
        reqs = [Request(f"q{i}", list(p), params) for i, p in enumerate(prompts)]
        batch.admit_group(list(zip(reqs, prefilled)))
        leaving, step = list(order), 0
        while len(batch):
            step += 1
            if leaving and step % 2 == 0:
                batch.abort(f"q{leaving.pop(0)}")
            batch.step()
        return [r.output_ids for r in reqs]

    whole = run([])
    assert all(len(ids) == 16 for ids in whole)
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 3, 5, 0, 2, 4], rng.sample(range(6), 6)):
        for i, ids in enumerate(run(order)):
            assert ids == whole[i][:len(ids)], (order, i)
