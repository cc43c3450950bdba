"""Other threads reach the engine only through its loop: the decode worker's handlers, its stats
and health read what the loop publishes, and the queue cap is counted without the engine."""
import threading

import pytest

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.loop import EngineLoop
from baton.engine.scheduler import QueueFull
from baton.request import Request
from baton.sampling import SamplingParams
from baton.v1 import decode_pb2
from decode_service.worker import DecodeServicer, DecodeWorker, worker_stats
from tiny_model import engine_greedy


class _Context:
    """What Attach asks of a gRPC context."""

    def add_callback(self, fn):
        return True

    def is_active(self):
        return True


class OnlyOnItsThread:
    """An engine that records every attribute read from a thread other than the loop's."""

    def __init__(self, engine: Engine):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "touched", [])

    def __getattr__(self, name):
        if threading.current_thread().name != "baton-engine":
            self.touched.append((threading.current_thread().name, name))
        return getattr(self._engine, name)


def test_the_decode_worker_reads_only_what_the_loop_publishes(tiny):
    box = {}

    def build():
        box["engine"] = OnlyOnItsThread(Engine(tiny, EngineConfig(max_batch=2, max_queue=4)))
        return box["engine"]
    loop = EngineLoop(build).start()
    try:
        worker = DecodeWorker(loop, stream_msgs_per_s=1000.0)
        svc = DecodeServicer(worker)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        for i, p in enumerate(prompts):
            worker.admit_prompt(Request(f"q{i}", p, SamplingParams(max_new_tokens=6, ignore_eos=True)))
        got = [[t for m in svc.Attach(decode_pb2.AttachRequest(request_id=f"q{i}", keepalive_s=1.0), _Context())
                for t in m.token_ids] for i in range(len(prompts))]
        stats = worker_stats(worker)
        assert stats.max_batch == 2 and stats.max_len == loop.info.max_len
        assert not loop.stalled(60.0) and loop.alive
        assert got == engine_greedy(tiny, prompts, 6)
    finally:
        loop.stop()
    assert box["engine"].touched == []
    _ = loop.engine.max_len                   # the check itself sees a read from this thread
    assert box["engine"].touched == [("MainThread", "max_len")]


def test_the_queue_cap_holds_while_the_loop_is_busy(tiny):
    loop = EngineLoop(Engine(tiny, EngineConfig(max_batch=1, max_queue=2))).start()
    release = threading.Event()
    try:
        blocked = threading.Thread(target=lambda: loop.call(lambda engine: release.wait(), timeout=None))
        blocked.start()                       # the loop thread waits inside a call: nothing is applied
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        streams = [loop.submit(Request(f"q{i}", [3, 4], params)) for i in range(2)]
        with pytest.raises(QueueFull, match="2 waiting"):
            loop.submit(Request("q2", [3, 4], params))
        release.set()
        blocked.join()
        assert all(len(list(s)) == 2 for s in streams)
        assert len(list(loop.submit(Request("q3", [3, 4], params)))) == 2   # room again once they ran
    finally:
        release.set()
        loop.stop()
