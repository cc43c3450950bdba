"""The services over loopback, in both topologies: a router with 2 prefill processes and 1 decode
process (disaggregated), and a router with 1 colocated worker (prefill and decode in one process)."""
from __future__ import annotations

import concurrent.futures as cf
import random
import time

import grpc
import pytest
import torch

from deploy.procs import wait_for
from loopback import loopback_cluster
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def cluster(request, tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    colocated = int(request.param == "colocated")
    with loopback_cluster(model_dir, prefill=2, decode=1, colocated=colocated, router_args=["--max-queue", "64"]) as c:
        from router.client import RouterClient
        with RouterClient(c["router"].address) as client:
            yield {**c, "client": client, "decode": c["decode"][0], "model_dir": model_dir, "topology": request.param}


@pytest.fixture(scope="module")
def ref_model():
    return tiny_llama()


def _prompt(rng, n):
    return [rng.randrange(1, EOS) for _ in range(n)]


def test_greedy_over_grpc_equals_generate_and_engine(cluster, ref_model):
    from baton.engine.engine import Engine
    from baton.sampling import SamplingParams
    rng = random.Random(5)
    prompts = [_prompt(rng, n) for n in (1, 17, 120)]
    local = Engine(ref_model).generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, loc in zip(prompts, local):
        text, ids, last = cluster["client"].complete(p, max_new_tokens=12, ignore_eos=True)
        assert ids == reference_greedy(ref_model, p, 12, ignore_eos=True) == loc.output_ids
        assert last.finish_reason == 1 and last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(p)
        # Disaggregated: layers * (K,V) * kv_heads * P * head_dim * 8 bytes cross the network; colocated: none.
        assert last.kv_bytes == (2 * 2 * 2 * len(p) * 16 * 8 if cluster["topology"] == "disaggregated" else 0)
        assert last.ttft_s > 0


def test_prompts_sharing_a_prefix_are_exact_and_the_workers_report_cache_hits(cluster, ref_model):
    """Sequential prompts that share a 40-token system prompt: generate()'s tokens, and the prefix
    caches (one per worker, on by default) report hits to the router (3 prompts, at most 2 workers
    that prefill: one of them sees two)."""
    rng = random.Random(11)
    system = _prompt(rng, 40)
    client = cluster["client"]
    before = sum(w.prefix_cache_hit_tokens for w in client.status().workers)
    for _ in range(3):
        p = system + _prompt(rng, 5)
        assert client.complete(p, max_new_tokens=6, ignore_eos=True)[1] == reference_greedy(ref_model, p, 6, ignore_eos=True)
    wait_for(lambda: sum(w.prefix_cache_hit_tokens for w in client.status().workers) >= before + 32, 10,
             what="a prefix cache hit of the system prompt's two 16-token blocks in the router's worker stats")


def test_unset_max_new_tokens_runs_to_the_context_the_prompt_leaves(cluster):
    prompt = _prompt(random.Random(8), 1000)     # the tiny model's context is 1024
    _, ids, last = cluster["client"].complete(prompt, ignore_eos=True, timeout=60)
    assert len(ids) == 24 and last.finish_reason == 1


def test_16_concurrent_streams_then_cancel_half(cluster, ref_model):
    rng = random.Random(9)
    client = cluster["client"]
    prompts = [_prompt(rng, rng.randint(1, 60)) for _ in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: client.complete(p, max_new_tokens=10, ignore_eos=True)[1], prompts))
    for p, ids in zip(prompts, results):
        assert ids == reference_greedy(ref_model, p, 10, ignore_eos=True)

    before = client.stats()
    doomed = [client.generate_stream(_prompt(rng, 30), max_new_tokens=900, ignore_eos=True) for _ in range(8)]
    kept = [client.generate_stream(_prompt(rng, 30), max_new_tokens=100, ignore_eos=True) for _ in range(8)]
    for c in doomed:
        next(c)                   # streaming has begun
        c.cancel()
    for c in kept:
        assert sum(len(r.token_ids) for r in c) == 100
    wait_for(lambda: (s := client.stats()).running == 0 and s.waiting == 0, 20, what="running == waiting == 0")
    assert client.status().topology == cluster["topology"]

    def decode_idle() -> bool:   # the router's release reaches the worker on its stream a moment later
        decode = [w for w in client.status().workers if w.role in ("decode", "colocated")][0]
        return decode.running == 0 and decode.waiting == 0
    wait_for(decode_idle, 10, what="the decode worker's rows and queue freed")
    after = client.stats()
    assert after.cancelled - before.cancelled == 8 and after.failed == before.failed
    assert after.completed - before.completed == 8
    assert client.complete([3, 4, 5], max_new_tokens=2)[1]  # still serves


@pytest.mark.parametrize("fields, needle", [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt="   "), "prompt must not be empty"),
    (dict(prompt_token_ids=[1] * 2000, max_new_tokens=4), "at most"),
    (dict(prompt_token_ids=[1], max_new_tokens=100000), "max_new_tokens must be in [1,"),
    (dict(prompt_token_ids=[1], temperature=-1.0), "temperature must be in [0, 100]"),
    (dict(prompt_token_ids=[1], top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt_token_ids=[1], stop=[""]), "stop string"),
    (dict(prompt_token_ids=[1], stop=["x"] * 20), "at most 8 stop strings"),
    (dict(prompt="hello"), "no tokenizer"),
])
def test_bad_input_is_invalid_argument(cluster, fields, needle):
    from baton.v1 import router_pb2
    with pytest.raises(grpc.RpcError) as e:
        list(cluster["client"].stub.Generate(router_pb2.GenerateRequest(**fields), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_malformed_kv_transfer_is_rejected_and_batch_goes_on(cluster, ref_model):
    from baton.v1 import decode_pb2, decode_pb2_grpc, common_pb2
    client = cluster["client"]
    running = client.generate_stream([5, 6, 7], max_new_tokens=300, ignore_eos=True)
    head = next(running)   # its first message: one or more tokens (as many as were ready)
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(cluster["decode"].address))
    params = common_pb2.SamplingParams(max_new_tokens=4)

    def transfer(shape, dtype="float64", nbytes=None, data=None, tokens=3, rid="bad"):
        n = 1
        for d in shape:
            n *= d
        nbytes = n * 8 if nbytes is None else nbytes
        header = decode_pb2.KVHeader(request_id=rid, prompt_token_ids=list(range(1, tokens + 1)), next_token=1,
                                     params=params, dtype=dtype, shape=shape, nbytes=nbytes)
        chunks = [decode_pb2.KVChunk(header=header)] + [decode_pb2.KVChunk(data=d) for d in (data or [b"\0" * nbytes])]
        return stub.TransferKV(iter(chunks), timeout=10)

    cases = [([3, 2, 2, 3, 16], {}, "shape"),                       # wrong layer count
             ([2, 2, 2, 3, 8], {}, "shape"),                        # wrong head_dim
             ([2, 2, 2, 3, 16], {"dtype": "float32", "nbytes": 2 * 2 * 2 * 3 * 16 * 4}, "dtype"),
             ([2, 2, 2, 4, 16], {}, "tokens"),                      # K/V length != prompt length
             ([2, 2, 2, 3, 16], {"data": [b"\0" * 10]}, "truncated"),
             ([2, 2, 2, 3, 16], {"data": [b"\0" * (2 * 2 * 2 * 3 * 16 * 8 + 1)]}, "more"),
             ([2, 2, 2, 3, 16], {"dtype": "int8"}, "dtype"),
             ([2, 2, 2, 3, 16], {"rid": ""}, "request_id")]
    for shape, kw, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            transfer(shape, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, kw, e.value.details())
        assert needle in e.value.details()
    assert len(head.token_ids) + sum(len(r.token_ids) for r in running) == 300  # the batch went on untouched
