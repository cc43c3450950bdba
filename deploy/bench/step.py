"""Decode-step micro-benchmark: the engine against a bare transformers forward loop.

    python -m deploy.bench.step [--model smollm2] [--batches 1 8 32] [--context 512] [--rounds 3]

Both run the same model, batch size and context side by side in one process, alternating;
the bare loop uses transformers' StaticCache. Also times one insertion and one removal.
"""
from __future__ import annotations

import argparse
import time

import torch

from baton.engine.batch import DecodeBatch
from baton.engine.cache import KVCapacity
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.prefill import PrefillOutput
from baton.model_loader import load_model
from baton.request import Request
from baton.sampling import SamplingParams


def filled_batch(engine: Engine, rows: int, ctx: int) -> DecodeBatch:
    r = engine.runner
    kv = torch.randn(r.num_layers, 2, r.num_kv_heads, ctx, r.head_dim, dtype=r.dtype, device=r.device) * 0.1
    cols = ctx + 1024                      # room for the steps timed, no compaction among them
    # On a GPU the step is captured as CUDA graphs for this batch size alone (the engine captures every bucket).
    batch = DecodeBatch(r, engine.model, max_batch=rows + 1, capacity=KVCapacity(rows + 1, cols, cols - 1, 0),
                        graphs=r.device.type == "cuda" and not engine.config.enforce_eager,
                        buckets=[rows] if r.device.type == "cuda" else None)
    for i in range(rows):
        req = Request(f"r{i}", [1] * ctx, SamplingParams(max_new_tokens=10 ** 6, ignore_eos=True))
        batch.admit(req, PrefillOutput(5, kv))
    return batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_step_s(engine: Engine, rows: int, ctx: int, iters: int) -> float:
    batch = filled_batch(engine, rows, ctx)
    batch.step()
    _sync(engine.runner.device)
    t = time.perf_counter()
    for _ in range(iters):
        batch.step()
    _sync(engine.runner.device)
    return (time.perf_counter() - t) / iters


@torch.no_grad()
def bare_step_s(model, rows: int, ctx: int, iters: int) -> float:
    from transformers import StaticCache
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=ctx + iters + 2)
    ids = torch.randint(0, model.config.vocab_size, (rows, ctx), device=device)
    tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(iters + 1):
        _sync(device)
        t = time.perf_counter()
        pos = torch.tensor([ctx + i], device=device)
        tok = model(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / iters


def insert_remove_s(engine: Engine, rows: int, ctx: int, reps: int = 10) -> tuple[float, float]:
    batch = filled_batch(engine, rows, ctx)
    r = engine.runner
    kv = torch.randn(r.num_layers, 2, r.num_kv_heads, ctx, r.head_dim, dtype=r.dtype, device=r.device)
    ins = rem = 0.0
    for i in range(reps):  # remove a middle row (the last row moves into it), then insert a newcomer
        _sync(r.device)
        t = time.perf_counter()
        batch.abort(batch.rows[i % (rows - 1)].request_id)
        _sync(r.device)
        rem += time.perf_counter() - t
        req = Request(f"new{i}", [1] * ctx, SamplingParams(max_new_tokens=10 ** 6, ignore_eos=True))
        t = time.perf_counter()
        batch.admit(req, PrefillOutput(5, kv))
        _sync(r.device)
        ins += time.perf_counter() - t
    return ins / reps, rem / reps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs on a GPU (always eager on CPU)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate engine and bare loop this many times; the best of each is kept (a shared "
                        "machine's noise only ever adds time)")
    a = p.parse_args(argv)
    model = load_model(a.model, a.dtype, a.device)
    # The engine's own batch is not used (filled_batch builds one per size): one row keeps it small.
    engine = Engine(model, EngineConfig(max_batch=1, enforce_eager=a.enforce_eager))
    print(f"device={engine.runner.device} dtype={a.dtype} context={a.context} threads={torch.get_num_threads()}")
    print("| batch | engine step ms | bare transformers step ms | engine / bare |")
    print("|---:|---:|---:|---:|")
    for rows in a.batches:
        e = b = float("inf")
        for _ in range(a.rounds):
            e = min(e, engine_step_s(engine, rows, a.context, a.iters))
            b = min(b, bare_step_s(model.model, rows, a.context, a.iters))
        print(f"| {rows} | {e * 1e3:.1f} | {b * 1e3:.1f} | {e / b:.2f} |", flush=True)
    rows = max(a.batches)
    ins, rem = insert_remove_s(engine, rows, a.context)
    print(f"insert one query into batch {rows} at context {a.context}: {ins * 1e3:.2f} ms; "
          f"remove one: {rem * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
