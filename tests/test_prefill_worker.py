"""The prefill worker's aborts, in process (prefill_service/worker.py): an Abort refuses the
request's attempts up to the one it names, so a retry elsewhere and then a migration back to this
worker is prefilled; an Abort with no attempt (the request is over) refuses every later one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from baton.engine.prefill import PrefillOutput
from baton.errors import NotFound
from baton.request import Request
from baton.sampling import SamplingParams
from prefill_service.worker import PrefillWorker


def _worker(sent: list) -> PrefillWorker:
    prefiller = SimpleNamespace(runner=SimpleNamespace(vocab_size=100), grammars=None)
    compute = lambda reqs: [PrefillOutput(7, torch.zeros(1, 2, 1, len(r.all_ids), 2)) for r in reqs]   # noqa: E731

    def send(address, req, pre, timeout_s):
        sent.append((req.request_id, address))
        return 0.0
    return PrefillWorker(prefiller, max_len=64, send=send, compute=compute)


def _req(rid="r") -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_new_tokens=4))


def test_an_abort_of_one_attempt_lets_a_later_attempt_through():
    sent = []
    w = _worker(sent)
    w.abort("r", attempt=1)                        # the router gave up on attempt 1 here
    with pytest.raises(NotFound):
        w.prefill(_req(), "decode-a:1", attempt=1)   # that attempt, arriving late, is refused
    assert w.prefill(_req(), "decode-b:1", attempt=2).num_tokens == 3    # a migration back here
    assert sent == [("r", "decode-b:1")]


def test_an_abort_of_the_whole_request_refuses_every_attempt():
    sent = []
    w = _worker(sent)
    w.abort("r")
    for attempt in (0, 1, 5):
        with pytest.raises(NotFound):
            w.prefill(_req(), "decode-a:1", attempt=attempt)
    assert sent == [] and w.load == 0
