"""The small operations of a layer around its matmuls: RMSNorm (after the residual add), SiLU-and-mul,
RoPE. torch's ops as HF computes them everywhere; on a CPU in float32/float64, baton's kernels
(baton/engine/kernels/elementwise.cpp): one pass over a token's vector each, where torch runs 2-6
kernels (RMSNorm alone is six) and pays their dispatch ~25 times a layer (see docs/benchmarks.md).
Each token's numbers come from its own vector only, in a fixed order, as the matmuls' do."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.engine.kernels import cpu_kernels_for


class TorchPointwise:
    def __init__(self, eps: float):
        self.eps = eps

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as HF computes it: in float32, scaled by the weight in the model dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h += delta, in place (the residual stream); returns RMSNorm(h)."""
        return self.rms_norm(h.add_(delta), weight)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(..., 2I): gate, then up -> silu(gate) * up (..., I)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x (..., H, D) rotated, x * cos + rotate_half(x) * sin as HF applies it, rotate_half's sign in
        `signed_sin` (ModelRunner.rope): the same products in one op fewer and no concatenation. May
        rotate x in place."""
        return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


class KernelPointwise(TorchPointwise):
    """The same operations by baton's CPU kernels, for the shapes the runner uses (token rows on
    one axis); anything else goes to torch's. RMSNorm only in float32: HF computes it in float32
    whatever the model's dtype, and a float64 model keeps exactly torch's numbers for it (the
    exact-token tests compare with generate() in float64)."""

    def __init__(self, eps: float, kernels):
        super().__init__(eps)
        self.k = kernels

    def rms_norm(self, x, weight):
        if x.dtype != torch.float32 or not x.is_contiguous():
            return super().rms_norm(x, weight)
        return self.k.add_rms_norm(x.view(-1, x.shape[-1]), None, weight, self.eps).view(x.shape)

    def add_rms_norm(self, h, delta, weight):
        if h.dtype != torch.float32 or not h.is_contiguous() or delta.shape != h.shape:
            return super().add_rms_norm(h, delta, weight)
        return self.k.add_rms_norm(h.view(-1, h.shape[-1]), delta.reshape(-1, h.shape[-1]), weight,
                                   self.eps).view(h.shape)

    def silu_mul(self, gate_up):
        if gate_up.dim() != 2:
            return super().silu_mul(gate_up)
        return self.k.silu_mul(gate_up)

    def rope(self, x, cos, signed_sin):
        if x.dim() != 3 or x.stride(-1) != 1:
            return super().rope(x, cos, signed_sin)
        self.k.rope_(x, cos, signed_sin)
        return x


def pointwise_for(device: torch.device, dtype: torch.dtype, eps: float) -> TorchPointwise:
    kernels = cpu_kernels_for(device, dtype)
    return KernelPointwise(eps, kernels) if kernels is not None else TorchPointwise(eps)
