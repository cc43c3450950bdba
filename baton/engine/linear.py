"""The runner's products by a weight, x @ Wᵀ (+ bias), and which code computes them.

On a CPU, for float32 and float64, baton's kernel (baton/engine/kernels/linear.cpp) runs them: the
weight is packed once into panels that a step streams from memory once per 256 of its rows, and each
output is summed in the same order whatever the number of rows, so a row's numbers (a decode row's or a
prompt token's) do not depend on its batch-mates, bit for bit. SmolLM2's 30 layers' projections,
weights cold (2 threads, an AVX-512 Xeon; docs/benchmarks.md): 8 rows 21.6 ms against MKL's 34.9, 32
rows 34.1 against 44.0, equal at 128. On a 2-core AMD EPYC (Zen 2, AVX2), from the GGUF blocks,
against MKL and oneDNN (its prepacked weights): 128 rows 165 ms against 264 and 203, 512 rows 667
against 865 and 775, 2,048 rows 2,981 against 3,381 and 3,168 (MKL takes a slow path on AMD's CPUs).
The packed copy costs the weights' memory once more. A float32 weight that came from GGUF blocks (the
built-in smollm2) is packed from those instead, still quantized (0.75 bytes a weight,
baton/engine/gguf_weights.py): the kernel widens a panel block at a time to exactly the float32
values, so the results are the same bits and a step streams a fifth of the bytes. Elsewhere (GPU,
bfloat16, no compiler) it is torch's `F.linear`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.engine.gguf_weights import Q4_1, QuantRows
from baton.engine.kernels import cpu_kernels_for
from baton.engine.models.layer import LayerWeights

# (vector bytes, from GGUF blocks) -> rows (tokens) of a step beyond which MKL is the faster; elsewhere
# the kernel runs every step. Float32 weights on an AVX-512 Xeon: equal at 128 rows, MKL ahead at 512
# (measured when the kernel still served all rows in one pass; from GGUF blocks a pass of 256 rows took
# 177.4 ms against MKL's 191.3, docs/benchmarks.md).
MAX_ROWS = {(64, False): 128}


def max_rows(kernels, quantized: bool = False) -> int | None:
    """Rows up to which the kernel runs a product, by the vector width it was built for (None: all)."""
    return MAX_ROWS.get((kernels.vector_bytes(), quantized))


def pack_quantized(rows: QuantRows, panel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuantRows (N rows) -> the kernel's panels of `panel` columns: q (P, K, panel/2) uint8 two 4-bit
    values a byte (column c low, c + panel/2 high) or (P, K, panel) int8; d, m (P, K/32, panel) (m empty
    for Q8_0). Padding columns are zeros."""
    N, K = rows.q.shape
    P = -(-N // panel)

    def panels(t: torch.Tensor) -> torch.Tensor:            # (N, X) -> (P, X, panel), padded with zeros
        padded = t.new_zeros(P * panel, t.shape[1])
        padded[:N] = t
        return padded.view(P, panel, -1).transpose(1, 2).contiguous()
    q = panels(rows.q)
    if rows.kind == Q4_1:
        q = (q[..., :panel // 2] | (q[..., panel // 2:] << 4)).contiguous()
    m = panels(rows.m) if rows.m is not None else torch.empty(0)
    return q, panels(rows.d), m


class Linear:
    """x (..., K) -> x @ weight.T + bias (..., N). `weight` (N, K) stays the caller's (HF's modules
    keep running on it); the kernel reads its own packed copy, from `quant` when given (float32 only)."""
    __slots__ = ("weight", "bias", "_kernels", "_packed", "_quant", "_max_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: QuantRows | None = None):
        self.weight, self.bias = weight, bias
        k = self._kernels = cpu_kernels_for(weight.device, weight.dtype)
        self._quant = pack_quantized(quant, k.float_panel()) if k and quant and weight.dtype == torch.float32 else None
        self._packed = k.pack(weight.detach()) if k and self._quant is None else None
        self._max_rows = max_rows(k, self._quant is not None) if k else None

    @property
    def packed(self) -> bool:
        return self._packed is not None or self._quant is not None

    @property
    def quantized(self) -> bool:
        return self._quant is not None

    @property
    def packed_bytes(self) -> int:
        if self._quant is not None:
            return sum(t.nbytes for t in self._quant)
        return self._packed.nbytes if self._packed is not None else 0

    def runs_on_kernel(self, rows: int) -> bool:
        """Whether a product of up to `rows` rows runs on the kernel (not on torch's F.linear)."""
        return self.packed and (self._max_rows is None or rows <= self._max_rows)

    def kernel_weights(self) -> tuple[torch.Tensor | None, tuple]:
        """What the kernel reads: the packed floats, or the GGUF panels (q, d, m) (None each where absent)."""
        return self._packed, self._quant or (None, None, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_on_kernel(x.numel() // x.shape[-1]):
            return F.linear(x, self.weight, self.bias)
        N = self.weight.shape[0]
        y = (self._kernels.linear_quantized(x, *self._quant, N) if self._quant
             else self._kernels.linear(x, self._packed, N))
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
    def of(cls, w: LayerWeights, quant: dict[str, QuantRows] | None = None) -> LayerLinears:
        """`quant`: the products' GGUF rows where the model came from a GGUF (gguf_weights.read)."""
        q = quant or {}
        return cls(Linear(w.qkv, w.qkv_bias, q.get("qkv")), Linear(w.o, w.o_bias, q.get("o")),
                   Linear(w.gate_up, w.gate_up_bias, q.get("gate_up")), Linear(w.down, w.down_bias, q.get("down")))
