"""The exact-token promise on a CUDA device: the engine in process and both topologies' worker
processes (float64, tiny random Llama) give every query generate()'s tokens on the GPU, whatever
its batch-mates. Skipped where torch sees no GPU (CI); run where one is lent:
`pytest tests/test_cuda.py`."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.request import Request
from baton.sampling import SamplingParams
from loopback import loopback_cluster
from router.client import RouterClient
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def tiny_cuda():
    m = tiny_llama()
    m.model.to("cuda")
    return m


def _queries(seed: int, n: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 120))] for _ in range(n)]
    return prompts, [rng.randint(1, 40) for _ in prompts]


def test_engine_on_cuda_equals_generate_whatever_the_batch_mates(tiny_cuda):
    prompts, lengths = _queries(7, 20)
    # Fewer rows than queries: rows join and leave the running batch while others decode.
    engine = Engine(tiny_cuda, EngineConfig(max_batch=6, max_queue=len(prompts)))
    assert engine.runner.device.type == "cuda"
    done = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
    for r, p, n in zip(done, prompts, lengths):
        assert r.output_ids == reference_greedy(tiny_cuda, p, n, ignore_eos=True), r.request_id


def test_graph_replay_equals_eager_and_generate(tiny_cuda):
    """The decode step captured as CUDA graphs (padded to its bucket) gives the eager step's tokens,
    and both give generate()'s, with rows joining and leaving; a capture holds every bucket."""
    prompts, lengths = _queries(5, 16)
    outs = {}
    for eager in (False, True):
        engine = Engine(tiny_cuda, EngineConfig(max_batch=6, max_queue=len(prompts), enforce_eager=eager))
        assert sorted(engine.batch.decode.graphs) == ([] if eager else [1, 2, 4, 6])
        done = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
        outs[eager] = [r.output_ids for r in done]
    assert outs[False] == outs[True]
    assert outs[False] == [reference_greedy(tiny_cuda, p, n, ignore_eos=True) for p, n in zip(prompts, lengths)]


def test_a_cuda_step_copies_to_the_host_once(tiny_cuda):
    """Sampled and penalised rows are chosen on the device: a step's host syncs do not grow with them."""
    engine = Engine(tiny_cuda, EngineConfig(max_batch=8, max_queue=8))
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=20, seed=i, repetition_penalty=1.1,
                             ignore_eos=True) for i in range(8)]
    for i, p in enumerate(_queries(3, 8)[0]):
        engine.add_request(Request(f"q{i}", p, params[i]))
    while len(engine.batch) < 8:
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as syncs:
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(syncs) <= 3, [str(w.message) for w in syncs]


@pytest.mark.parametrize("colocated", [0, 1], ids=["disaggregated", "colocated"])
def test_workers_on_cuda_serve_exact_tokens(tiny_cuda, tmp_path, colocated):
    model_dir = save_tiny(tmp_path / "model")
    prompts, lengths = _queries(11, 12)
    with loopback_cluster(model_dir, colocated=colocated, worker_args=["--device", "cuda"]) as c, \
            RouterClient(c["router"].address) as client, ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda q: client.complete(q[0], max_new_tokens=q[1], ignore_eos=True, timeout=120)[1],
                             zip(prompts, lengths)))
    for ids, p, n in zip(outs, prompts, lengths):
        assert ids == reference_greedy(tiny_cuda, p, n, ignore_eos=True)
