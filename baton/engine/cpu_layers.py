"""A CPU decode step's layers in one call to baton's kernels (kernels/layers.cpp): the kernels the
runner's layer methods call one by one, in the same order, without the Python and tensor-op dispatch
around them (~25 ops a layer: 8 ms of a 47 ms step of 8 rows, 10 of 119 at 32, on 2 Zen 2 cores).

It runs where every piece of the step is one of baton's CPU kernels: float32 (RMSNorm runs on torch's
ops for float64, to keep HF's numbers), no per-head q/k norms (qwen3), and no product that hands
large steps to MKL (`Linear`'s row limit, float32 weights on AVX-512). Elsewhere the runner's layer
methods run the step (baton/engine/decode_graphs.py)."""
from __future__ import annotations

import torch

from baton.engine.cache import BatchKVCache, StepInputs
from baton.engine.kernels import cpu_kernels
from baton.engine.runner import ModelRunner


class CpuLayers:
    def __init__(self, runner: ModelRunner):
        self.r, self.k = runner, cpu_kernels()
        empty = torch.empty(0, dtype=runner.dtype)
        self.weights: list[torch.Tensor] = []       # per layer: in_norm, post_norm, then each product's tensors
        self.widths: list[int] = []                 # per layer: each product's output width
        for L, P in zip(runner.layers, runner.linears):
            self.weights += [L.in_norm, L.post_norm]
            for lin in P:
                packed, (q, d, m) = lin.kernel_weights()
                self.weights += [x if x is not None else empty for x in (packed, q, d, m, lin.bias)]
                self.widths.append(lin.weight.shape[0])

    @classmethod
    def of(cls, runner: ModelRunner, max_rows: int) -> CpuLayers | None:
        """The loop for a step of up to `max_rows` rows, where the kernels run all of it; else None."""
        fits = (runner.uses_cpu_kernels and runner.dtype == torch.float32
                and all(L.q_norm is None for L in runner.layers)
                and all(lin.runs_on_kernel(max_rows) for P in runner.linears for lin in P))
        return cls(runner) if fits else None

    def __call__(self, h: torch.Tensor, cache: BatchKVCache, step: StepInputs, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        """h (n, hidden) through every layer, in place; the rows' K/V into the step's column.
        cos, sin (n, 1, D): the rows' RoPE tables (ModelRunner.rope)."""
        r = self.r
        self.k.decode_layers(h, self.weights, self.widths, cache.buf, cache.start, step.col + 1, step.lengths,
                             cos, sin, r.num_heads, r.eps, r.scale)
