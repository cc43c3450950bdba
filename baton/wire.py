"""Conversions between engine objects and baton.v1 messages, at the edge only."""
from __future__ import annotations

from baton.request import TokenEvent
from baton.sampling import SamplingParams
from baton.v1 import common_pb2, decode_pb2


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                     top_k=p.top_k, seed=p.seed, stop=list(p.stop), ignore_eos=p.ignore_eos)


def params_from_pb(m: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p or 1.0,
                          top_k=m.top_k, seed=m.seed, stop=tuple(m.stop), ignore_eos=m.ignore_eos)


def event_to_pb(e: TokenEvent) -> decode_pb2.TokenEvent:
    return decode_pb2.TokenEvent(token_id=e.token_id, text=e.text, index=e.index,
                                 finish_reason=int(e.finish_reason or 0))
