"""Decode.Follow keeps every promise of the per-request Attach stream (issue 19), in process: exact
tokens, one message per step for all requests, release and the router's going away free rows, one
listener per request, a bounded wait for K/V, a reader that stops reading stalls neither the batch nor
another router's stream, keep-alives only while the engine goes round (decode_service/follow.py), and
the router's end of it: rows to their requests, a link's failure to all of them (router/follow_link.py)."""
from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.loop import EngineLoop
from baton.request import Request
from baton.sampling import SamplingParams
from baton.v1 import decode_pb2
from decode_service.follow import Follow
from decode_service.worker import DecodeWorker
from router.follow_link import FollowLink, StreamEnd
from tests.tiny_model import engine_greedy, tiny_llama

N = 24


class _Router:
    """The router's side of one Follow stream, in process: what it sends, and the worker's answers."""

    def __init__(self, worker: DecodeWorker, keepalive_s: float = 0.0, attach_timeout_s: float = 30.0):
        self.sent: queue.SimpleQueue = queue.SimpleQueue()
        self.follow = Follow(worker, attach_timeout_s=attach_timeout_s, stall_s=15.0)
        self.thread = threading.Thread(target=self.follow.read, args=(self._requests(),), daemon=True)
        self.thread.start()
        self.send(decode_pb2.FollowMessage(keepalive_s=keepalive_s))
        self.messages = self.follow.messages(context=None)

    def _requests(self):
        while (m := self.sent.get()) is not None:
            yield m

    def send(self, m) -> None:
        self.sent.put(m)

    def attach(self, rid: str, timeout_s: float = 0.0) -> None:
        self.send(decode_pb2.FollowMessage(request_id=rid, timeout_s=timeout_s))

    def release(self, rid: str) -> None:
        self.send(decode_pb2.FollowMessage(request_id=rid, release=True))

    def leave(self) -> None:
        self.sent.put(None)

    def read_until(self, done, limit: int = 2000) -> list[decode_pb2.StepTokens]:
        out = []
        for m in self.messages:   # bounded: each message is a step (or a keep-alive)
            out.append(m)
            if done(out) or len(out) >= limit:
                return out
        return out


def _tokens(msgs, rid: str) -> list[int]:
    out = []
    for m in msgs:
        at = 0
        for r, n in zip(m.request_ids, m.counts):
            if r == rid:
                out += m.token_ids[at:at + n]
            at += n
    return out


def _finished(msgs, rid: str) -> bool:
    return any(r == rid and f for m in msgs for r, f in zip(m.request_ids, m.finish_reasons))


def _ends(msgs) -> dict[str, str]:
    return {e.request_id: e.code for m in msgs for e in m.ends}


@pytest.fixture
def served():
    model = tiny_llama()
    loop = EngineLoop(Engine(model, EngineConfig(max_batch=4, max_queue=8))).start()
    yield model, loop, DecodeWorker(loop)
    loop.stop()


def _admit(worker, rid, prompt, n=N):
    worker.admit_prompt(Request(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)))


def test_every_request_s_tokens_exact_and_one_message_carries_the_step_of_all(served):
    model, loop, worker = served
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    want = engine_greedy(model, prompts, N)
    router = _Router(worker)
    for i, p in enumerate(prompts):
        router.attach(f"r{i}")
        _admit(worker, f"r{i}", p)
    msgs = router.read_until(lambda ms: all(_finished(ms, f"r{i}") for i in range(3)))
    assert [_tokens(msgs, f"r{i}") for i in range(3)] == want
    assert any(len(set(m.request_ids)) == 3 for m in msgs)   # the rows of one step in one message
    assert not worker.slots and not router.follow.attached
    router.leave()


def test_a_release_frees_the_row_and_the_router_leaving_frees_the_rest(served):
    model, loop, worker = served
    router = _Router(worker)
    for rid, p in (("a", [5, 6]), ("b", [7, 8])):
        router.attach(rid)
        _admit(worker, rid, p, n=500)
    router.read_until(lambda ms: _tokens(ms, "a") and _tokens(ms, "b"))
    router.release("a")
    deadline = time.monotonic() + 10
    while "a" in loop.engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "a" not in loop.engine.requests and "b" in loop.engine.requests and "a" not in worker.slots
    router.leave()
    list(router.messages)   # the stream ends once the router's side has
    while loop.engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.engine.has_work() and not worker.slots


def test_one_listener_per_request_and_a_bounded_wait_for_its_kv(served):
    model, loop, worker = served
    first, second = _Router(worker), _Router(worker)
    first.attach("x")
    _admit(worker, "x", [5, 6, 7])
    first.read_until(lambda ms: _tokens(ms, "x"))
    second.attach("x")                      # another router's stream: refused, the first keeps it
    second.attach("never", timeout_s=0.2)   # no K/V ever comes
    ends = _ends(second.read_until(lambda ms: len(_ends(ms)) == 2))
    assert ends == {"x": "ALREADY_EXISTS", "never": "DEADLINE_EXCEEDED"}
    rest = first.read_until(lambda ms: _finished(ms, "x"))
    assert _finished(rest, "x")
    first.leave()
    second.leave()


def test_a_router_that_stops_reading_stalls_neither_the_batch_nor_another_router(served):
    model, loop, worker = served
    prompts = [[5, 6, 7], [8, 9]]
    want = engine_greedy(model, prompts, N)
    slow, fast = _Router(worker), _Router(worker)
    slow.attach("slow")
    fast.attach("fast")
    _admit(worker, "slow", prompts[0])
    _admit(worker, "fast", prompts[1])
    head = slow.read_until(lambda ms: _tokens(ms, "slow"))   # then it reads nothing for a while
    got = fast.read_until(lambda ms: _finished(ms, "fast"))
    assert _tokens(got, "fast") == want[1]
    deadline = time.monotonic() + 10
    while loop.engine.has_work() and time.monotonic() < deadline:   # the slow row finishes unread
        time.sleep(0.01)
    assert not loop.engine.has_work()
    rest = slow.read_until(lambda ms: _finished(ms, "slow"))
    assert _tokens(head + rest, "slow") == want[0] and len(rest) == 1   # all it missed in one message
    slow.leave()
    fast.leave()


def test_keepalives_only_while_the_engine_goes_round(served):
    model, loop, worker = served
    router = _Router(worker, keepalive_s=0.05)
    assert next(router.messages).keepalive
    router.follow.stall_s = -1e9           # the engine now counts as stalled (whatever its last beat): silence
    box = []
    t = threading.Thread(target=lambda: box.append(next(router.messages)), daemon=True)
    t.start()
    t.join(0.5)
    assert not box
    router.follow.stall_s = 15.0
    t.join(10)
    assert box and box[0].keepalive
    router.leave()


# ---- the router's end ----------------------------------------------------------------------------
class _Call:
    """A Follow call's answers, fed by the test; ends with an error when told."""

    def __init__(self):
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False

    def __iter__(self):
        while (m := self.answers.get()) is not None:
            if isinstance(m, Exception):
                raise m
            yield m

    def cancel(self):
        self.cancelled = True
        self.answers.put(None)


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "worker gone"


def _link():
    call, sent = _Call(), []

    def follow(requests, metadata=None):
        threading.Thread(target=lambda: sent.extend(requests), daemon=True).start()
        return call
    handle = SimpleNamespace(worker_id="w", address="a", stub=SimpleNamespace(Follow=follow))
    return FollowLink(handle, auth=None, keepalive_s=1.0, on_end=lambda link: None), call, sent


def test_the_link_gives_each_request_its_rows_and_a_failure_to_all():
    link, call, sent = _link()
    a, b = link.attach("a", 5.0), link.attach("b", 5.0)
    call.answers.put(decode_pb2.StepTokens(request_ids=["a", "b"], counts=[2, 1], token_ids=[1, 2, 3],
                                           texts=["x", "y"], finish_reasons=[0, 0]))
    call.answers.put(decode_pb2.StepTokens(request_ids=["a"], counts=[1], token_ids=[4], texts=["z"],
                                           finish_reasons=[1]))
    got = list(a)
    assert [t for x in got for t in x.token_ids] == [1, 2, 4] and "".join(x.text for x in got) == "xz"
    assert got[-1].finish_reason == 1 and "a" not in link.subs   # finished: nothing to release
    assert b.take().token_ids == [3]
    call.answers.put(_RpcError())
    with pytest.raises(StreamEnd) as e:
        b.take()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert link.attach("c", 5.0).items.get().code() == grpc.StatusCode.UNAVAILABLE   # an ended link refuses


def test_a_request_streamed_to_a_function_gets_what_was_queued_first_then_each_step_on_the_reader_s_thread():
    """Subscription.stream_to (the in-process gateway's relay): the chunks queued before it go first, in
    order; later ones are handed over by the link's reader thread as they come (nothing else is woken);
    the link's failure ends it the same way."""
    link, call, sent = _link()
    a = link.attach("a", 5.0)
    call.answers.put(decode_pb2.StepTokens(request_ids=["a"], counts=[1], token_ids=[1], texts=["x"],
                                           finish_reasons=[0]))
    deadline = time.monotonic() + 5
    while a.items.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    got, threads = [], []
    a.stream_to(lambda item: (got.append(item), threads.append(threading.get_ident())))
    call.answers.put(decode_pb2.StepTokens(request_ids=["a"], counts=[2], token_ids=[2, 3], texts=["yz"],
                                           finish_reasons=[0]))
    call.answers.put(_RpcError())
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(g.token_ids, g.text) for g in got[:2]] == [([1], "x"), ([2, 3], "yz")]
    assert isinstance(got[2], StreamEnd) and got[2].code() == grpc.StatusCode.UNAVAILABLE
    assert threads[0] == threading.get_ident() and threads[1] == link.thread.ident


class _OwnPrefill:
    """A colocated worker's Prefill role as Follow drives it: refuses what its check refuses, else
    hands the prompt to the worker's own batch (decode_service/colocated.py ColocatedPrefill)."""

    own_address = "me:1"

    def __init__(self, worker):
        self.worker, self.seen = worker, []

    def prefill(self, req, address, attempt):
        from baton.errors import InvalidArgument
        self.seen.append((req.request_id, address, attempt))
        if any(t >= 256 for t in req.all_ids):
            raise InvalidArgument("token ids must be in [0, 256)", field="prompt")
        self.worker.admit_prompt(req)


def test_a_colocated_worker_prefills_what_its_stream_names_and_says_what_it_refused(served):
    from baton.v1 import prefill_pb2
    from baton.wire import params_to_pb
    model, loop, worker = served
    want = engine_greedy(model, [[5, 6, 7]], N)
    router = _Router(worker)
    router.follow.colocated = _OwnPrefill(worker)
    params = params_to_pb(SamplingParams(max_new_tokens=N, ignore_eos=True))
    for rid, ids in (("ok", [5, 6, 7]), ("bad", [5, 999])):
        router.send(decode_pb2.FollowMessage(request_id=rid, prefill=prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=ids, params=params, decode_address="me:1", attempt=1)))
    msgs = router.read_until(lambda ms: _finished(ms, "ok") and _ends(ms))
    assert _tokens(msgs, "ok") == want[0]
    bad = [e for m in msgs for e in m.ends]
    assert [(e.request_id, e.code, e.field) for e in bad] == [("bad", "INVALID_ARGUMENT", "prompt")]
    assert router.follow.colocated.seen == [("ok", "me:1", 1), ("bad", "me:1", 1)]
    assert not worker.slots
    router.leave()


def test_a_refusal_on_the_stream_reaches_the_client_with_its_field():
    from router.request_run import _from_rpc
    err = _from_rpc(StreamEnd(grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in [0, 256)", "prompt"))
    assert err.code_name == "INVALID_ARGUMENT" and err.field == "prompt"


def test_a_stopping_worker_ends_idle_streams_and_finishes_the_busy_ones(served):
    """A router's stream with nothing on it must not hold a worker's stop for its whole grace."""
    model, loop, worker = served
    want = engine_greedy(model, [[5, 6, 7]], N)
    idle, busy = _Router(worker, keepalive_s=30.0), _Router(worker, keepalive_s=30.0)
    busy.attach("r")
    _admit(worker, "r", [5, 6, 7])
    head = busy.read_until(lambda ms: _tokens(ms, "r"))
    worker.end_follows()
    assert list(idle.messages) == []          # ended at once, not after a keep-alive period
    rest = list(busy.messages)                # runs to its request's end, then ends
    assert _tokens(head + rest, "r") == want[0] and _finished(rest, "r")
    idle.leave()
    busy.leave()


def test_a_request_whose_client_reads_slowly_holds_back_no_other_on_the_link():
    """The link's reader never waits for a request's reader: an unread request's rows queue up."""
    link, call, sent = _link()
    slow, fast = link.attach("slow", 5.0), link.attach("fast", 5.0)
    steps = 500
    for i in range(steps):
        call.answers.put(decode_pb2.StepTokens(request_ids=["slow", "fast"], counts=[1, 1], token_ids=[i, i],
                                               texts=["s", "f"], finish_reasons=[0, int(i == steps - 1)]))
    got = [t for x in fast for t in x.token_ids]      # runs to its end while "slow" reads nothing
    assert got == list(range(steps))
    merged = slow.take()                              # all it missed, in one piece
    assert merged.token_ids == list(range(steps)) and merged.text == "s" * steps
