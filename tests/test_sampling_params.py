"""The sampling features beyond temperature/top-k/top-p, against transformers' generate() on a tiny
random Llama in float64: logprobs (log-softmax of the raw logits), logit_bias, min_tokens, the
repetition / presence / frequency penalties; alone == in a batch == migrated mid-stream."""
import dataclasses
import random

import pytest
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

from baton.engine.batch import DecodeBatch
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.prefill import Prefiller
from baton.request import Request
from baton.sampling import InvalidParam, SamplingParams
from baton.wire import logprobs_from_pb, logprobs_to_pb, params_from_pb, params_to_pb
from tiny_model import EOS

PROMPT = [5, 9, 17, 3, 88, 41, 9, 5, 120, 7, 7, 33]


class BiasRef(LogitsProcessor):
    """logit_bias as OpenAI defines it: added to the token's logit."""

    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids, scores):
        for t, b in self.bias.items():
            scores[:, t] += b
        return scores


class PresenceFrequencyRef(LogitsProcessor):
    """OpenAI's penalties over the output tokens: logit - frequency * count - presence * [count > 0]."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            for t in set(ids):
                scores[row, t] -= self.frequency * ids.count(t) + self.presence
        return scores


def hf_greedy(tiny, prompt, n, processors=(), **kw):
    ids = torch.tensor([prompt])
    out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, logits_processor=LogitsProcessorList(processors),
                              output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[0, len(prompt):].tolist(), out.logits


def same_logprobs(a, b) -> bool:
    """Equal ids, values equal to float64's last bits (a prompt prefilled in chunks sums in another order)."""
    return len(a) == len(b) and all(
        [t for t, _ in x.top] == [t for t, _ in y.top] and abs(x.logprob - y.logprob) < 1e-12
        and all(abs(u - v) < 1e-12 for (_, u), (_, v) in zip(x.top, y.top)) for x, y in zip(a, b))


def run_alone(tiny, prompt, params):
    return Engine(tiny).generate([prompt], params)[0]


def test_logprobs_are_log_softmax_of_generate_logits_in_float64(tiny):
    """generate() hands out its logits cast to float32 (output_logits): equal to those within float32's
    rounding; the model's own float64 logits for the same ids (what generate() casts): equal to float64's
    last bits (1e-12; the forward passes differ in length, so in summation order)."""
    tokens, logits = hf_greedy(tiny, PROMPT, 12, eos_token_id=None)
    req = run_alone(tiny, PROMPT, SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=5))
    assert req.output_ids == tokens
    with torch.no_grad():
        full = tiny.model(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:]    # (n + 1, V) float64
    assert full.dtype == torch.float64
    for i, (t, lg) in enumerate(zip(tokens, logits)):
        got = req.output_logprobs[i]
        exact = torch.log_softmax(full[i], dim=-1)
        top = torch.topk(exact, 5)
        assert abs(got.logprob - float(exact[t])) < 1e-12 and [tid for tid, _ in got.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(got.top, top.values.tolist())) < 1e-12
        ref = torch.log_softmax(lg[0].to(torch.float64), dim=-1)                         # generate()'s
        assert abs(got.logprob - float(ref[t])) < 1e-6
        assert [tid for tid, _ in got.top] == torch.topk(ref, 5).indices.tolist()


def test_logprobs_of_sampled_tokens_are_the_raw_distribution(tiny):
    p = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=20, seed=5, ignore_eos=True, logprobs=0)
    req = run_alone(tiny, PROMPT, p)
    plain = run_alone(tiny, PROMPT, dataclasses.replace(p, logprobs=None))
    assert req.output_ids == plain.output_ids           # asking for logprobs changes nothing
    assert all(lp.top == () and lp.logprob <= 0 for lp in req.output_logprobs)


def test_plus_100_logit_bias_forces_the_token(tiny):
    req = run_alone(tiny, PROMPT, SamplingParams(max_new_tokens=8, logit_bias=((42, 100.0),), logprobs=1))
    assert req.output_ids == [42] * 8
    sampled = run_alone(tiny, PROMPT, SamplingParams(max_new_tokens=8, temperature=1.0, logit_bias=((42, 100.0),)))
    assert sampled.output_ids == [42] * 8
    banned = run_alone(tiny, PROMPT, SamplingParams(max_new_tokens=8, logit_bias=((42, -100.0),)))
    assert 42 not in banned.output_ids


def test_min_tokens_holds_back_eos_as_generate(tiny):
    """A +100 bias on EOS would end the output at once; min_tokens=5 holds it back for 5 tokens."""
    params = SamplingParams(max_new_tokens=20, min_tokens=5, logit_bias=((EOS, 100.0),))
    ref, _ = hf_greedy(tiny, PROMPT, 20, [BiasRef({EOS: 100.0}), MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, EOS)],
                       eos_token_id=EOS)
    req = run_alone(tiny, PROMPT, params)
    assert req.output_ids == ref and len(ref) == 6 and ref[-1] == EOS and EOS not in ref[:5]


PENALTIES = [
    (dict(repetition_penalty=1.8), lambda: [RepetitionPenaltyLogitsProcessor(1.8)]),
    (dict(repetition_penalty=0.6), lambda: [RepetitionPenaltyLogitsProcessor(0.6)]),
    (dict(presence_penalty=1.5, frequency_penalty=0.7), lambda: [PresenceFrequencyRef(len(PROMPT), 1.5, 0.7)]),
    (dict(frequency_penalty=-1.2), lambda: [PresenceFrequencyRef(len(PROMPT), 0.0, -1.2)]),
    (dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.9, logit_bias=((11, 2.5),)),
     lambda: [BiasRef({11: 2.5}), RepetitionPenaltyLogitsProcessor(1.3), PresenceFrequencyRef(len(PROMPT), 0.4, 0.9)]),
]


@pytest.mark.parametrize("kw, procs", PENALTIES, ids=[str(k) for k, _ in PENALTIES])
def test_penalties_change_greedy_output_as_generate(tiny, kw, procs):
    n = 24
    ref, _ = hf_greedy(tiny, PROMPT, n, procs(), eos_token_id=None)
    plain, _ = hf_greedy(tiny, PROMPT, n, eos_token_id=None)
    assert ref != plain, "the penalty should change this greedy output"
    assert run_alone(tiny, PROMPT, SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)).output_ids == ref


def _penalised(seed: int, greedy: bool) -> SamplingParams:
    return SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.4, presence_penalty=0.5,
                          frequency_penalty=0.8, min_tokens=3, logit_bias=((13, 1.5),), logprobs=3,
                          temperature=0.0 if greedy else 0.9, seed=seed)


@pytest.mark.parametrize("greedy", [True, False])
def test_penalised_request_alone_equals_in_a_busy_batch(tiny, greedy):
    rng = random.Random(7)
    target, params = PROMPT, _penalised(11, greedy)
    alone = run_alone(tiny, target, params)
    others = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 60))] for _ in range(6)]
    other_params = [SamplingParams(max_new_tokens=rng.randint(1, 25), temperature=rng.choice([0.0, 1.1]),
                                   repetition_penalty=rng.choice([1.0, 1.2]), frequency_penalty=rng.choice([0.0, -0.5]),
                                   seed=rng.randrange(100)) for _ in others]
    busy = Engine(tiny, EngineConfig(max_batch=4, prefill_chunk_tokens=16)).generate(
        others[:2] + [target] + others[2:], other_params[:2] + [params] + other_params[2:])
    assert busy[2].output_ids == alone.output_ids
    assert same_logprobs(busy[2].output_logprobs, alone.output_logprobs)


@pytest.mark.parametrize("greedy", [True, False])
def test_migrated_request_keeps_its_penalties_state(tiny, greedy):
    """Migration re-prefills prompt + tokens so far on another worker, which gets the output ids apart
    from the prompt (generated_token_ids) and the params over the wire: the tokens go on exactly."""
    params = _penalised(3, greedy)
    alone = run_alone(tiny, PROMPT, params)
    for k in (1, 7, 15):
        moved = params_from_pb(params_to_pb(params))
        req = Request(f"m{k}", list(PROMPT), moved, output_ids=list(alone.output_ids[:k]))
        prefiller = Prefiller(Engine(tiny).runner)
        batch = DecodeBatch(prefiller.runner, tiny, max_batch=4)
        (pre,) = prefiller.prefill_many([Request(req.request_id, req.prompt_ids, moved, output_ids=req.output_ids)])
        pre.logprobs = logprobs_from_pb(logprobs_to_pb(pre.logprobs))   # as the K/V header carries it
        events = batch.admit(req, pre)
        while len(batch):
            events += batch.step()
        assert req.output_ids == alone.output_ids, k
        assert same_logprobs([e.logprobs for e in events], alone.output_logprobs[k:])


def test_params_survive_the_wire():
    p = SamplingParams(repetition_penalty=1.2, presence_penalty=-0.3, frequency_penalty=0.1, min_tokens=4,
                       logit_bias=((3, -100.0), (7, 0.1)), logprobs=0, seed=9, min_p=0.25)
    assert params_from_pb(params_to_pb(p)) == p
    assert params_from_pb(params_to_pb(SamplingParams(seed=1))).logprobs is None


@pytest.mark.parametrize("kw, field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=11.0), "repetition_penalty"), (dict(min_tokens=65), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(logit_bias=((5, 100.5),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"), (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs")])
def test_validation_names_the_field(kw, field):
    with pytest.raises(InvalidParam, match=field) as e:
        SamplingParams(**kw).validate()
    assert e.value.field == field


def test_logit_bias_token_must_be_in_the_vocabulary():
    SamplingParams(logit_bias=((255, 1.0),)).validate(256)
    with pytest.raises(InvalidParam, match=r"\[0, 256\)"):
        SamplingParams(logit_bias=((256, 1.0),)).validate(256)
