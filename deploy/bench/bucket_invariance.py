"""Does a row's greedy text depend on the batch size its step runs at? (bfloat16 on a GPU, where
matmul kernels are chosen per shape: the question CUDA graph buckets raise.)

    python -m deploy.bench.bucket_invariance [--model smollm2] [--dtype bfloat16] [--prompts 64]
                                             [--buckets 32 128 256] [--tokens 32]

The same prompts run alone (batch size 1), then inside full batches of each size (filled with other
prompts); prints the share of prompts whose greedy tokens are identical to their run alone, and
where the first difference falls. float64 on the tiny test model is exact (tests/test_decode_graphs.py);
this measures what a real dtype does.
"""
from __future__ import annotations

import argparse
import random

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.model_loader import load_model
from baton.sampling import SamplingParams


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    done = engine.generate(prompts, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    return [r.output_ids for r in done]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=64, help="prompts whose text is compared")
    p.add_argument("--buckets", type=int, nargs="+", default=[32, 128, 256], help="batch sizes they run inside")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    a = p.parse_args(argv)
    model = load_model(a.model, a.dtype, a.device)
    rng = random.Random(0)
    V = model.model.config.vocab_size
    prompt = lambda: [rng.randrange(100, V - 100) for _ in range(rng.randint(16, 128))]  # noqa: E731
    targets = [prompt() for _ in range(a.prompts)]
    alone_engine = Engine(model, EngineConfig(max_batch=1, max_queue=a.prompts, enforce_eager=a.enforce_eager))
    alone = greedy(alone_engine, targets, a.tokens)
    del alone_engine
    print(f"{a.model} {a.dtype} on {next(model.model.parameters()).device}, {a.prompts} prompts x {a.tokens} tokens")
    print("| batch size | identical to alone | first difference at token (median) |")
    print("|---:|---:|---:|")
    for size in a.buckets:
        engine = Engine(model, EngineConfig(max_batch=size, max_queue=a.prompts * size,
                                            enforce_eager=a.enforce_eager))
        same, first = 0, []
        for i in range(0, a.prompts, size):   # each group of targets fills its batch with other prompts
            group = targets[i:i + size]
            fill = [prompt() for _ in range(size - len(group))]
            outs = greedy(engine, group + fill, a.tokens)[:len(group)]
            for out, ref in zip(outs, alone[i:i + size]):
                same += out == ref
                if out != ref:
                    first.append(next(k for k, (x, y) in enumerate(zip(out, ref)) if x != y))
        med = sorted(first)[len(first) // 2] if first else "-"
        print(f"| {size} | {same}/{a.prompts} ({100 * same / a.prompts:.0f} %) | {med} |", flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
