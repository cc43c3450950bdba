"""Tokens leave a decode worker several to a message (issue 19), in process: a TokenStream hands over
every event that is ready at once, a chunk carries one logprob per token, a request's stream is paced by
how many the worker serves, and a reader that stops reading stalls neither the batch nor another stream
(decode_service/worker.py Attach, baton/engine/loop.py TokenStream.get_ready, baton/wire.py)."""
from __future__ import annotations

import queue
import time
from types import SimpleNamespace

import pytest

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.loop import EngineLoop, StreamClosed, TokenStream
from baton.request import Request, TokenEvent
from baton.sampling import Logprobs, SamplingParams
from baton.v1 import decode_pb2
from baton.wire import events_to_pb
from decode_service import worker as worker_mod
from decode_service.worker import DecodeServicer, DecodeWorker
from tests.tiny_model import engine_greedy, tiny_llama


def _ev(i: int, finish=None, lp=None) -> TokenEvent:
    return TokenEvent("r", 10 + i, f"w{i} ", i, finish, lp)


def test_get_ready_takes_every_ready_event_and_the_end_after_them():
    stream = TokenStream(loop=None, request=None)
    with pytest.raises(queue.Empty):
        stream.get_ready(timeout=0.01)
    for i in range(3):
        stream.events.put(_ev(i))
    stream.events.put(StreamClosed("cancelled"))
    assert [e.index for e in stream.get_ready(timeout=1)] == [0, 1, 2]
    with pytest.raises(StreamClosed):
        stream.get_ready(timeout=1)
    done = TokenStream(loop=None, request=None)
    for i, f in ((0, None), (1, 1), (2, None)):   # nothing after the last token is taken with it
        done.events.put(_ev(i, f))
    assert [e.index for e in done.get_ready(timeout=1)] == [0, 1]


def test_a_chunk_is_its_tokens_text_and_one_logprob_per_token():
    lps = [Logprobs(-0.5 * i, ((10 + i, -0.5 * i),)) for i in range(3)]
    m = events_to_pb([_ev(i, 2 if i == 2 else None, lps[i]) for i in range(3)])
    assert list(m.token_ids) == [10, 11, 12] and m.text == "w0 w1 w2 " and m.index == 0 and m.finish_reason == 2
    assert [round(x.logprob, 6) for x in m.logprobs] == [0.0, -0.5, -1.0] and m.logprobs[1].top[0].token_id == 11
    assert not events_to_pb([_ev(0)]).logprobs


def test_pace_grows_with_the_streams_served_and_is_capped():
    loop = SimpleNamespace(info=SimpleNamespace(kv_shape=(1, 2, 1, 1), dtype=None, vocab_size=10, max_len=8,
                                                grammars=None),
                           submit=lambda req: f"stream-{req.request_id}", abort=lambda rid: None)
    w = DecodeWorker(loop, stream_msgs_per_s=100.0)
    for rid in ("a", "b", "c"):
        w.admit_prompt(Request(rid, [1], SamplingParams(max_new_tokens=2)))
        w.try_attach(rid, 0)
    assert w.pace_s() == pytest.approx(0.03)
    w.release("a")
    w.release("a")          # twice (done-callback and finally): counted once
    w.abort("b")
    assert w.listening == 1 and w.pace_s() == pytest.approx(0.01)
    for i in range(100):
        w.admit_prompt(Request(f"x{i}", [1], SamplingParams(max_new_tokens=2)))
        w.try_attach(f"x{i}", 0)
    assert w.pace_s() == worker_mod.MAX_PACE_S


class _Context:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, fn):
        self.callbacks.append(fn)
        return True

    def is_active(self):
        return True


def test_a_reader_that_stops_reading_stalls_neither_the_batch_nor_another_stream():
    model = tiny_llama()
    prompts, n = [[5, 6, 7], [8, 9]], 40
    want = engine_greedy(model, prompts, n)
    loop = EngineLoop(Engine(model, EngineConfig(max_batch=4, max_queue=8))).start()
    try:
        worker = DecodeWorker(loop, stream_msgs_per_s=1000.0)
        svc = DecodeServicer(worker)
        for rid, p in zip(("slow", "fast"), prompts):
            worker.admit_prompt(Request(rid, p, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        slow = svc.Attach(decode_pb2.AttachRequest(request_id="slow", keepalive_s=1.0), _Context())
        head = next(slow)   # then it reads nothing while the other stream runs to its end
        fast = [m for m in svc.Attach(decode_pb2.AttachRequest(request_id="fast", keepalive_s=1.0), _Context())
                if not m.keepalive]
        assert [t for m in fast for t in m.token_ids] == want[1] and fast[-1].finish_reason == 1
        deadline = time.monotonic() + 10
        while loop.has_work() and time.monotonic() < deadline:   # the slow row finishes unread
            time.sleep(0.01)
        assert not loop.has_work()
        rest = [m for m in slow if not m.keepalive]
        assert list(head.token_ids) + [t for m in rest for t in m.token_ids] == want[0]
        assert len(rest) == 1   # everything made while nobody read goes in one message
        assert worker.listening == 0 and not worker.slots
    finally:
        loop.stop()
