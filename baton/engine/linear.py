"""The runner's products by a weight, x @ Wᵀ (+ bias), and which code computes them.

On a CPU, for float32 and float64, baton's kernel (baton/engine/kernels/linear.cpp) runs steps of up
to `max_rows()` tokens: the weight is packed once into panels that a step streams from memory once,
and each output is summed in the same order whatever the number of rows, so a decode row's numbers
do not depend on its batch-mates, bit for bit. SmolLM2's 30 layers' projections, weights cold (2
threads, an AVX-512 Xeon; docs/benchmarks.md): 8 rows 21.6 ms against MKL's 34.9, 32 rows 34.1 against
44.0, equal at 128, slower at 512, so longer prompt steps keep MKL. Built for AVX2 (8-float vectors) on
the same machine, against MKL held to AVX2 as well (what an AVX2 machine runs): 8 rows 24.3 against
40.9, 32 rows 49.8 against 68.5, 128 rows 142.0 against 149.2, equal at 192. The packed copy costs the
weights' memory once more. A float32 weight that came from GGUF blocks (the built-in smollm2) is
packed from those instead, still quantized (0.75 bytes a weight, baton/engine/gguf_weights.py): the
kernel widens a panel block at a time to exactly the float32 values, so the results are the same bits
and a step streams a fifth of the bytes. Steps longer than the kernel takes (prompt pieces) run oneDNN
on its own prepacked copy of a float32 weight: on a 2-core AMD EPYC (Zen 2, AVX2) SmolLM2's 30 layers at
512 rows took 749 ms against MKL's 889 and at 2,048 rows 2,842 against 3,353 (MKL takes a slower path on
AMD), about equal on an AVX-512 Xeon. Elsewhere (GPU, bfloat16, float64, no compiler) it is torch's `F.linear`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.engine.gguf_weights import Q4_1, QuantRows
from baton.engine.kernels import cpu_kernels_for
from baton.engine.models.layer import LayerWeights

# (vector bytes, from GGUF blocks) -> rows (tokens) of a step up to which the kernel beats MKL on float32
# weights: measured above; SmolLM2's layers from GGUF blocks, AVX-512: 91.8 vs 102.5 ms at 128 rows,
# 177.4 vs 191.3 at 256, 287.9 vs 269.7 at 384. AVX2 machines are mostly AMD's, where the kernel beats
# both MKL and oneDNN up to 256 rows (Zen 2, GGUF blocks / float32: 248.6 / 249.9 ms at 192 rows against
# MKL's 385.4 and oneDNN's 302; 327.9 / 337.8 at 256 against 498.9 and 379; equal to oneDNN at 512); on
# a Xeon held to AVX2 the kernel and MKL were equal at 192-256 (docs/benchmarks.md).
MAX_ROWS = {(64, False): 128, (64, True): 256, (32, False): 256, (32, True): 256}


def onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's own prepacked copy of a float32 CPU weight (N, K), for the long steps; None where
    oneDNN does not serve (another device or dtype, a torch built without it)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 512)    # 512: the rows it is laid out for


def max_rows(kernels, quantized: bool = False) -> int:
    """Rows up to which the kernel runs a product, by the vector width it was built for."""
    return MAX_ROWS[kernels.vector_bytes(), quantized]


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
    __slots__ = ("weight", "bias", "_kernels", "_packed", "_quant", "_max_rows", "_onednn")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: QuantRows | None = None,
                 *, long_steps: bool = True):
        """long_steps: products of more rows than the kernel takes are expected (prompt pieces), so
        oneDNN's copy is worth its memory (the weight's size once more)."""
        self.weight, self.bias = weight, bias
        k = self._kernels = cpu_kernels_for(weight.device, weight.dtype)
        self._quant = pack_quantized(quant, k.float_panel()) if k and quant and weight.dtype == torch.float32 else None
        self._packed = k.pack(weight.detach()) if k and self._quant is None else None
        self._max_rows = max_rows(k, self._quant is not None) if k else 0
        self._onednn = onednn_packed(weight) if k and long_steps else None

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed or x.numel() > self._max_rows * x.shape[-1]:
            if self._onednn is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self._onednn, self.bias, "none", [], "")
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
