"""The sampling features of the OpenAI API honoured end to end, with the official `openai` client:
gateway -> router -> prefill/decode worker processes -> back (tiny float64 model, word tokenizer).
n > 1, logprobs (chat and completions, streamed and not) against the model's own float64 logits,
logit_bias, min_tokens and the penalties against generate() with the same processors, the gRPC
fields, and a request migrated mid-stream that keeps its penalties state."""
from __future__ import annotations

import random
import signal

import httpx2 as httpx
import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from deploy.procs import wait_for
from baton.sampling import SamplingParams
from baton.wire import logprobs_from_pb
from loopback import loopback_cluster
from router.client import RouterClient
from test_http_gateway import env, ref_model  # noqa: F401  (module fixtures: a cluster + gateway here)
from test_sampling_params import BiasRef, PresenceFrequencyRef, hf_greedy, same_logprobs
from test_stalls import LONG, SILENCE_S
from tiny_model import EOS, save_tiny, tiny_llama


def _exact_logprobs(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """log-softmax of the model's float64 logits predicting ids[n_prompt:] -> (n, V)."""
    with torch.no_grad():
        logits = model.model(torch.tensor([ids])).logits[0, n_prompt - 1:-1]
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def token_text(env):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(env["model_dir"])
    return lambda t: tok.decode([t])


def test_n_2_gives_two_independent_seeded_choices(env):
    oa, prompt = env["oa"], "w5 w9 w17 w3"
    kw = dict(model="model", prompt=prompt, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    r = oa.completions.create(n=2, seed=40, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    singles = [oa.completions.create(seed=40 + i, **kw) for i in range(2)]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 12 and r.usage.total_tokens == 16
    # streamed: each choice's chunks under its index, one finish each, usage summed at the end
    stream = oa.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}], n=2,
                                        seed=7, max_tokens=5, temperature=1.0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    whole = oa.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}], n=2, seed=7,
                                       max_tokens=5, temperature=1.0, extra_body={"ignore_eos": True})
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length"} and usage.completion_tokens == 10


def test_chat_logprobs_are_the_models_float64_log_softmax(env, ref_model, token_text):
    oa, msgs = env["oa"], [{"role": "user", "content": "w5 w9 w17"}]
    prompt = httpx.post(env["url"] + "/tokenize", json={"messages": msgs}, timeout=30).json()["tokens"]
    kw = dict(model="model", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    r = oa.chat.completions.create(**kw)
    ids = r.choices[0].model_extra["token_ids"]
    ref = _exact_logprobs(ref_model, prompt + ids, len(prompt))
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(t) for t in ids]
    for c, t, row in zip(content, ids, ref):
        top = torch.topk(row, 3)
        assert abs(c.logprob - float(row[t])) < 1e-12 and c.bytes == list(token_text(t).encode())
        assert [x.token for x in c.top_logprobs] == [token_text(i) for i in top.indices.tolist()]
        assert all(abs(x.logprob - v) < 1e-12 for x, v in zip(c.top_logprobs, top.values.tolist()))
    streamed = [c for chunk in oa.chat.completions.create(stream=True, **kw) for ch in chunk.choices
                if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_completions_logprobs_k(env, ref_model, token_text):
    prompt = [5, 9, 17, 3, 88]
    r = env["oa"].completions.create(model="model", prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    ids, lp = c.model_extra["token_ids"], c.logprobs
    ref = _exact_logprobs(ref_model, prompt + ids, len(prompt))
    assert lp.tokens == [token_text(t) for t in ids]
    assert all(abs(v - float(row[t])) < 1e-12 for v, t, row in zip(lp.token_logprobs, ids, ref))
    assert all(set(top) >= {token_text(i) for i in torch.topk(row, 2).indices.tolist()} | {token_text(t)}
               for top, row, t in zip(lp.top_logprobs, ref, ids))
    assert lp.text_offset == [sum(len(token_text(t)) for t in ids[:i]) for i in range(len(ids))]
    streamed = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for chunk in env["oa"].completions.create(model="model", prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                              stream=True, extra_body={"ignore_eos": True}):
        for k, v in streamed.items():
            v += getattr(chunk.choices[0].logprobs, k) if chunk.choices[0].logprobs else []
    assert streamed == {k: getattr(lp, k) for k in streamed}   # text_offset counts on across chunks


def test_logit_bias_plus_100_forces_the_token(env):
    r = env["oa"].chat.completions.create(model="model", messages=[{"role": "user", "content": "w5"}], max_tokens=4,
                                          temperature=0.8, logit_bias={"42": 100},
                                          extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == [42] * 4 and r.choices[0].message.content.split() == ["w42"] * 4


PROMPT = [5, 9, 17, 3, 88, 41, 9, 5, 120, 7, 7, 33]
PENALISED = [
    (dict(repetition_penalty=1.8), lambda: [RepetitionPenaltyLogitsProcessor(1.8)], None),
    (dict(presence_penalty=1.5, frequency_penalty=0.7), lambda: [PresenceFrequencyRef(len(PROMPT), 1.5, 0.7)], None),
    (dict(min_tokens=5, logit_bias={str(EOS): 100.0}),
     lambda: [BiasRef({EOS: 100.0}), MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, EOS)], EOS),
]


@pytest.mark.parametrize("fields, procs, eos", PENALISED, ids=["repetition", "presence-frequency", "min_tokens"])
def test_penalties_over_http_as_generate(env, ref_model, fields, procs, eos):
    ref, _ = hf_greedy(ref_model, PROMPT, 16, procs(), eos_token_id=eos)
    r = env["oa"].completions.create(model="model", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={**fields, "ignore_eos": eos is None, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref


def test_min_p_honoured_over_http(env):
    """min_p = 1 keeps only the most likely token: a hot sample is then the greedy answer; min_p = 0.2
    reaches the workers and its tokens are among those of at least 0.2 x the top one's probability."""
    oa, kw = env["oa"], dict(model="model", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
    greedy = oa.completions.create(temperature=0, **kw).choices[0].text
    hot = oa.completions.create(temperature=5.0, seed=3, **{**kw, "extra_body": {**kw["extra_body"], "min_p": 1.0}})
    assert hot.choices[0].text == greedy
    free = oa.completions.create(temperature=5.0, seed=3, **kw).choices[0].text
    assert free != greedy   # without min_p the same seed wanders off


def test_grpc_generate_carries_logprobs_per_token(env):
    msgs = list(env["grpc"].generate([5, 9, 17], max_new_tokens=5, ignore_eos=True, logprobs=2, repetition_penalty=1.3))
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs) and sum(len(m.token_ids) for m in msgs) == 5
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for m in msgs for lp in m.logprobs)


def test_grpc_out_of_range_is_invalid_argument_naming_the_field(env):
    import grpc
    for fields, name in ((dict(presence_penalty=3.0), "presence_penalty"), (dict(logit_bias={300: 1.0}), "logit_bias"),
                         (dict(min_tokens=9, max_new_tokens=4), "min_tokens"), (dict(logprobs=21), "logprobs"),
                         (dict(min_p=2.0), "min_p")):
        with pytest.raises(grpc.RpcError) as e:
            env["grpc"].complete([5, 9], **fields)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in e.value.details()


def test_migrated_stream_keeps_its_penalties_exact(tmp_path):
    """A decode worker stopped mid-stream: its requests migrate (prompt + tokens so far re-prefilled
    elsewhere, the output ids apart from the prompt) and go on with exactly the tokens and logprobs of
    an uninterrupted run."""
    rng, n = random.Random(31), 2   # one stream on each decode worker
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(4, 30))] for _ in range(n)]
    fields = dict(max_new_tokens=LONG, ignore_eos=True, repetition_penalty=1.1, presence_penalty=0.3,
                  frequency_penalty=0.05, logit_bias={13: 1.5}, min_tokens=3, logprobs=1)
    params = SamplingParams(**{**fields, "logit_bias": ((13, 1.5),)}, seed=0)
    ref = Engine(tiny_llama(), EngineConfig(max_batch=n)).generate(prompts, params)
    model_dir = save_tiny(tmp_path / "model")
    with loopback_cluster(model_dir, prefill=1, decode=2, router_args=["--worker-silence-s", str(SILENCE_S)]) as c, \
            RouterClient(c["router"].address) as client:
        base = client.stats()
        calls = [client.generate_stream(p, timeout=60, **fields) for p in prompts]
        firsts = [next(call) for call in calls]
        c["decode"][0].signal(signal.SIGSTOP)
        try:
            got = [[f, *call] for f, call in zip(firsts, calls)]   # the messages of each stream
        finally:
            c["decode"][0].signal(signal.SIGCONT)
        for msgs, r in zip(got, ref):
            assert [t for m in msgs for t in m.token_ids] == r.output_ids
            lps = [logprobs_from_pb(lp) for m in msgs for lp in m.logprobs]
            assert same_logprobs(lps, r.output_logprobs)
        assert client.stats().migrations > base.migrations
        wait_for(lambda: client.stats().running == 0, 10, what="router drained")
