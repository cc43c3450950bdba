"""Conversions between engine objects and baton.v1 messages, at the edge only."""
from __future__ import annotations

import dataclasses

from baton.errors import InvalidArgument
from baton.request import TokenEvent
from baton.sampling import InvalidParam, Logprobs, SamplingParams, bias_pairs
from baton.v1 import common_pb2, decode_pb2, router_pb2

# The one finish-reason table: the proto's FinishReason names, as OpenAI and the metrics spell them.
FINISH_NAMES = {number: name.removeprefix("FINISH_REASON_").lower()
                for name, number in router_pb2.FinishReason.items() if number}


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    m = common_pb2.SamplingParams(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=p.seed,
        stop=list(p.stop), ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens,
        logit_bias=dict(p.logit_bias), json_schema=p.json_schema, regex=p.regex, grammar=p.grammar)
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def params_from_pb(m: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p or 1.0,
                          top_k=m.top_k, min_p=m.min_p, seed=m.seed, stop=tuple(m.stop), ignore_eos=m.ignore_eos,
                          **_processors(m))


def _processors(m) -> dict:
    """The logit processors and logprobs of a SamplingParams or GenerateRequest message (same field names)."""
    return dict(presence_penalty=m.presence_penalty, frequency_penalty=m.frequency_penalty,
                repetition_penalty=m.repetition_penalty or 1.0, min_tokens=m.min_tokens,
                logit_bias=bias_pairs(m.logit_bias), logprobs=m.logprobs if m.HasField("logprobs") else None,
                json_schema=m.json_schema, regex=m.regex, grammar=m.grammar)


def sampling_from_request(r, base: SamplingParams, vocab_size: int | None = None) -> SamplingParams:
    """The router's SamplingParams for a GenerateRequest: `base` (checked against the router's limits)
    with the request's logit processors and logprobs, validated (INVALID_ARGUMENT naming the field)."""
    params = dataclasses.replace(base, **_processors(r))
    try:
        params.validate(vocab_size)
    except InvalidParam as e:
        raise InvalidArgument(str(e), field=e.field) from None
    return params


def logprobs_to_pb(lp: Logprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(logprob=lp.logprob, top=[common_pb2.TokenLogprob(token_id=t, logprob=v)
                                                             for t, v in lp.top])


def logprobs_from_pb(m: common_pb2.TokenLogprobs) -> Logprobs:
    return Logprobs(m.logprob, tuple((t.token_id, t.logprob) for t in m.top))


def events_to_pb(events: list[TokenEvent]) -> decode_pb2.TokenChunk:
    """One request's consecutive events (at least one) as one message."""
    last = events[-1]
    m = decode_pb2.TokenChunk(token_ids=[e.token_id for e in events], text="".join(e.text for e in events),
                              index=events[0].index, finish_reason=int(last.finish_reason or 0))
    if any(e.logprobs is not None for e in events):   # the request asked for them: one per token
        m.logprobs.extend(logprobs_to_pb(e.logprobs) if e.logprobs is not None else common_pb2.TokenLogprobs()
                          for e in events)
    return m
