"""A model's linear weights as its GGUF file ships them (Q4_1 blocks; Q8_0 for the embedding that is
also the LM head), for baton's CPU kernels to stream in place of their float32 widening: 0.75 bytes a
weight in memory instead of 4, and the same values exactly (the kernel widens each block as GGUF's
dequantisation does, d * q + m, where d * q is exact in float32).

Which GGUF row is which row of the loaded weight (the converter permutes Q and K's rows) is not
assumed: each GGUF tensor is widened here and its rows are matched to the loaded float32 rows bit for
bit; a tensor whose rows do not all match is left to the float32 path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 32                                  # weights a GGUF block scales together
Q4_1, Q8_0 = "Q4_1", "Q8_0"
# LayerWeights' stacked products: (the layer's submodule, its linears in stacking order)
PRODUCTS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
            "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass(frozen=True)
class QuantRows:
    """A weight (N, K) as GGUF blocks, rows in the loaded weight's order: q (N, K) the small integers
    (uint8 0..15 for Q4_1, int8 for Q8_0), d and m (N, K / 32) each block's scale and minimum (m None
    for Q8_0)."""
    kind: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    def widened(self) -> torch.Tensor:
        """(N, K) float32, as GGUF's dequantisation computes it."""
        w = self.q.float().unflatten(1, (-1, BLOCK)) * self.d[..., None]
        return (w if self.m is None else w + self.m[..., None]).flatten(1)

    @staticmethod
    def cat(parts: list[QuantRows]) -> QuantRows:
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot stack {sorted(kinds)} rows")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantRows(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)


def _blocks(tensor) -> QuantRows | None:
    """A GGUFReader tensor's raw blocks (N, bytes) -> QuantRows, for the two kinds the kernel reads."""
    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data)
    N = raw.shape[0]
    if kind == Q4_1:
        b = raw.reshape(N, -1, 20)
        low, high = b[..., 4:] & 15, b[..., 4:] >> 4                      # weights j and j + 16 of a block
        q = np.concatenate([low, high], axis=-1).reshape(N, -1)
        d, m = (b[..., i:i + 2].copy().view(np.float16)[..., 0].astype(np.float32) for i in (0, 2))
        return QuantRows(kind, torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))
    if kind == Q8_0:
        b = raw.reshape(N, -1, 34)
        q = b[..., 2:].copy().view(np.int8).reshape(N, -1)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        return QuantRows(kind, torch.from_numpy(q), torch.from_numpy(d), None)
    return None


def _matched(rows: QuantRows, weight: torch.Tensor) -> QuantRows | None:
    """rows reordered to `weight`'s rows, if every one of them is a GGUF row bit for bit."""
    w = weight.detach().float().contiguous()
    if rows.q.shape != w.shape:
        return None
    widened = rows.widened()
    if torch.equal(widened, w):          # most tensors: the same order (only Q and K are permuted)
        return rows
    index = {r.tobytes(): i for i, r in enumerate(widened.numpy())}
    order = [index.get(r.tobytes()) for r in w.numpy()]
    if any(i is None for i in order):
        return None
    at = torch.tensor(order)
    return QuantRows(rows.kind, rows.q[at], rows.d[at], None if rows.m is None else rows.m[at])


def read(hf_model: torch.nn.Module, path: Path) -> tuple[list[dict[str, QuantRows]], QuantRows | None]:
    """Per decoder layer, {"qkv", "o", "gate_up", "down"} -> QuantRows for each product whose parts all
    match (LayerWeights' stacking: q, k, v and gate, up), and the LM head's rows (or None)."""
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def rows(name: str, weight: torch.Tensor) -> QuantRows | None:
        t = tensors.get(name)
        found = _blocks(t) if t is not None else None
        return _matched(found, weight) if found is not None else None

    layers = []
    for i, layer in enumerate(hf_model.model.layers):
        found = {}
        for product, (block, names) in PRODUCTS.items():
            modules = getattr(layer, block)
            parts = [rows(f"blk.{i}.{HF_TO_GGUF[n]}.weight", getattr(modules, n).weight) for n in names]
            if all(p is not None for p in parts):
                found[product] = QuantRows.cat(parts)
        layers.append(found)
    head = hf_model.lm_head.weight
    lm_head = rows("output.weight", head) or rows("token_embd.weight", head)
    log.info("%s: %d of %d layer products and %s LM head kept as GGUF blocks", path.name,
             sum(len(f) for f in layers), 4 * len(layers), "the" if lm_head is not None else "not the")
    return layers, lm_head
