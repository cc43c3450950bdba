"""The runner's products by a weight, x @ Wᵀ (+ bias), and which code computes them.

On a CPU, for float32 and float64, baton's kernel (baton/engine/kernels/linear.cpp) runs steps of up
to `max_rows()` tokens: the weight is packed once into panels that a step streams from memory once,
and each output is summed in the same order whatever the number of rows, so a decode row's numbers
do not depend on its batch-mates, bit for bit. SmolLM2's 30 layers' projections, weights cold (2
threads, an AVX-512 Xeon; docs/benchmarks.md): 8 rows 21.6 ms against MKL's 34.9, 32 rows 34.1 against
44.0, equal at 128, slower at 512, so longer prompt steps keep MKL. Built for AVX2 (8-float vectors) on
the same machine: 8 rows 22.4 against 33.4, equal at 32, 1.4x slower at 128. The packed copy costs the
weights' memory once more. Elsewhere (GPU, bfloat16, no compiler) it is torch's `F.linear`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.engine.kernels import cpu_kernels
from baton.engine.models.layer import LayerWeights

MAX_ROWS = {64: 128, 32: 32}   # vector bytes -> rows (tokens) of a step up to which the kernel beats MKL


def max_rows(kernels) -> int:
    """Rows up to which the kernel runs a product (measured above), by the vector width it was built for."""
    return MAX_ROWS[kernels.vector_bytes()]


class Linear:
    """x (..., K) -> x @ weight.T + bias (..., N). `weight` (N, K) stays the caller's (HF's modules
    keep running on it); the kernel reads its own packed copy."""
    __slots__ = ("weight", "bias", "_kernels", "_packed", "_max_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        cpu = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
        self._kernels = cpu_kernels() if cpu else None
        self._packed = self._kernels.pack(weight.detach()) if self._kernels else None
        self._max_rows = max_rows(self._kernels) if self._kernels else 0

    @property
    def packed(self) -> bool:
        return self._packed is not None

    @property
    def packed_bytes(self) -> int:
        return self._packed.nbytes if self._packed is not None else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.numel() > self._max_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        y = self._kernels.linear(x, self._packed, self.weight.shape[0])
        return y if self.bias is None else y.add_(self.bias)


@dataclass(frozen=True)
class LayerLinears:
    """A layer's four products (Q/K/V and gate/up already stacked by LayerWeights)."""
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear

    def __iter__(self):
        return iter((self.qkv, self.o, self.gate_up, self.down))

    @classmethod
    def of(cls, w: LayerWeights) -> LayerLinears:
        return cls(Linear(w.qkv, w.qkv_bias), Linear(w.o, w.o_bias), Linear(w.gate_up, w.gate_up_bias),
                   Linear(w.down, w.down_bias))
