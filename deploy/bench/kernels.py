"""baton's CPU kernels against torch's, on SmolLM2's shapes (what chose them; docs/benchmarks.md).

    python -m deploy.bench.kernels [--rows 1 8 32 128] [--context 256] [--repeats 5]

For each row count: the 30 layers' four products (each weight read once a pass, so the weights come
from memory as in a step) by MKL's `F.linear` on the float32 weights, by baton's packed float32 kernel
and from the GGUF blocks; the LM head likewise; and one step's decode attention over 30 layers of
rows of ragged lengths (up to --context tokens) by baton's kernel and by torch's SDPA with the mask.
Best of --repeats, milliseconds.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from baton.engine.kernels import cpu_kernels
from baton.engine.linear import Linear
from baton.engine.runner import ModelRunner
from baton.model_loader import load_model


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128], help="tokens a step multiplies")
    ap.add_argument("--context", type=int, default=256, help="the longest row's tokens, for attention")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("baton's CPU kernels are not built here (see the warning above)")
    model = load_model("smollm2", "float32", "cpu")
    runner = ModelRunner(model.model, model.gguf)                          # products from GGUF blocks
    layers = [lin for L in runner.linears for lin in L]
    packed = [Linear(lin.weight) for lin in layers]                        # the same weights, packed float32
    head = Linear(runner.lm_head_weight)
    n_rows, H, G, D, L = max(args.rows), runner.num_kv_heads, runner.group, runner.head_dim, runner.num_layers
    T = args.context + 1
    kv = torch.randn(L, 2, min(n_rows, 64), H, T, D) * 0.1
    print(f"SmolLM2, {torch.get_num_threads()} threads, {8 * kernels.vector_bytes()}-bit vectors; ms, best of {args.repeats}")
    print("| rows | layers MKL | layers baton f32 | layers GGUF | head MKL | head baton f32 | head GGUF "
          "| attention baton | attention SDPA |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for M in args.rows:
        x = {576: torch.randn(M, 576), 1536: torch.randn(M, 1536)}
        for lin in layers + packed + [head, runner.lm_head]:
            lin._max_rows = None                                             # time the kernel at every row count
        cells = [best_ms(lambda: [F.linear(x[lin.weight.shape[1]], lin.weight) for lin in layers], args.repeats),
                 best_ms(lambda: [lin(x[lin.weight.shape[1]]) for lin in packed], args.repeats),
                 best_ms(lambda: [lin(x[lin.weight.shape[1]]) for lin in layers], args.repeats),
                 best_ms(lambda: F.linear(x[576], runner.lm_head_weight), args.repeats),
                 best_ms(lambda: head(x[576]), args.repeats), best_ms(lambda: runner.lm_head(x[576]), args.repeats)]
        n = min(M, kv.shape[2])                                             # attention over up to 64 rows
        lens = torch.tensor([T - (i % 4) * (T // 5) for i in range(n)])      # ragged, right-aligned
        hidden = torch.arange(T)[None] < (T - lens)[:, None]
        mask = torch.zeros(n, T).masked_fill_(hidden, float("-inf"))[:, None, None]
        q = torch.randn(n, H, G, D)
        cells += [best_ms(lambda: [kernels.decode_attention(q, kv[li, 0, :n], kv[li, 1, :n], lens, D ** -0.5)
                                   for li in range(L)], args.repeats),
                  best_ms(lambda: [F.scaled_dot_product_attention(q, kv[li, 0, :n], kv[li, 1, :n], attn_mask=mask,
                                                                  scale=D ** -0.5) for li in range(L)], args.repeats)]
        print(f"| {M} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
