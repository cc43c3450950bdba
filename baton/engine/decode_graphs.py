"""The decode step over static buffers, cut into pieces that CUDA graphs replay.

A step of n rows runs at the smallest batch-size bucket b >= n (1, 2, 4, 8, 16, 24, 32, ... the
batch's rows, as nano-vllm and SGLang capture): the rows' token ids and positions are copied into
static inputs, rows n..b are padding. Each layer's weight work is one piece: layer li's output
projection and MLP fused with layer li+1's norm, QKV projection and RoPE; the first piece embeds,
the last computes the logits (layers + 1 pieces). Attention runs between the pieces, eagerly, over
the cache's live window for the n real rows only: the window's width changes every step, which a
graph cannot follow, and so a padding row never writes into the cache (vLLM's piecewise CUDA
graphs make the same cut). A step is then layers + 1 graph launches plus a handful of attention
kernels per layer, instead of ~35 kernel launches per layer.

On a CPU, or with --enforce-eager, the same pieces run as plain calls over the same buffers,
unpadded: that is the twin CI runs (padded to buckets when a test asks). Where baton's CPU kernels run
the whole step, its layers run in one call to them instead (cpu_layers.py), the same kernels in the
same order. Everything a piece reads or writes lives in the buffers
allocated here once; nothing in a piece reads a value back to the host.
"""
from __future__ import annotations

import logging
import time

import torch

from baton.engine.cache import BatchKVCache
from baton.engine.cpu_layers import CpuLayers
from baton.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def buckets_for(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 32 beyond, ending at max_rows."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 32 else 16 if b < 128 else 32)
    return sizes + [max_rows]


class DecodeGraphs:
    """Runs decode-only steps of `runner` for up to `max_rows` rows.

    `capture`: record each piece as a CUDA graph per bucket (a CUDA runner only); otherwise run
    the pieces eagerly, padded to `buckets` when given (tests), else unpadded."""

    def __init__(self, runner: ModelRunner, max_rows: int, *, capture: bool = False, buckets: list[int] | None = None):
        self.r = runner
        self.buckets = sorted(buckets) if buckets else (buckets_for(max_rows) if capture else None)
        B = self.buckets[-1] if self.buckets else max_rows
        dev, dt, r = runner.device, runner.dtype, runner
        hidden, D = r.embed_weight.shape[1], r.head_dim
        # Static inputs, state between pieces, and outputs: (B, ...) each, written in place.
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.cos = torch.zeros(B, 1, D, dtype=dt, device=dev)
        self.sin = torch.zeros(B, 1, D, dtype=dt, device=dev)
        self.h = torch.zeros(B, hidden, dtype=dt, device=dev)
        self.q = torch.zeros(B, r.num_heads, D, dtype=dt, device=dev)
        self.k = torch.zeros(B, r.num_kv_heads, D, dtype=dt, device=dev)
        self.v = torch.zeros(B, r.num_kv_heads, D, dtype=dt, device=dev)
        self.attn = torch.zeros(B, r.num_heads * D, dtype=dt, device=dev)
        self.logits = torch.zeros(B, r.vocab_size, dtype=dt, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        # a CPU step that baton's kernels run whole, unpadded: its layers in one call (cpu_layers.py)
        self.layers = None if capture or buckets else CpuLayers.of(runner, max_rows)
        if capture:
            self._capture()

    # ---- the pieces ----------------------------------------------------------------------------
    def _piece(self, li: int, b: int) -> None:
        """Piece li over the first b rows: (li == 0) embed + RoPE tables, else layer li-1's output
        projection and MLP; then layer li's QKV (or, after the last layer, the logits)."""
        r = self.r
        if li == 0:
            self.h[:b].copy_(r.embed(self.ids[:b]))                            # (b, hidden)
            cos, sin = r.rope(self.pos[:b])                                    # (b, 1, D)
            self.cos[:b].copy_(cos)
            self.sin[:b].copy_(sin)
        else:
            r.attn_out_mlp(li - 1, self.h[:b], self.attn[:b])                  # h updated in place
        if li < r.num_layers:
            q, k, v = r.qkv(li, self.h[:b], (self.cos[:b], self.sin[:b]))
            self.q[:b].copy_(q)
            self.k[:b].copy_(k)
            self.v[:b].copy_(v)
        else:
            self.logits[:b].copy_(r.logits(self.h[:b]))

    def _capture(self) -> None:
        t0, before = time.monotonic(), torch.cuda.memory_reserved(self.r.device)
        pool = None
        for b in reversed(self.buckets):           # the largest first: the shared pool is sized by it
            graphs = []
            for li in range(self.r.num_layers + 1):
                self._piece(li, b)                 # warm-up (lazy inits, cuBLAS workspaces) outside the graph
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._piece(li, b)
                pool = pool or g.pool()            # pieces replay one at a time: one pool serves all
                graphs.append(g)
            self.graphs[b] = graphs
        torch.cuda.synchronize(self.r.device)
        self.capture_s, self.capture_bytes = time.monotonic() - t0, torch.cuda.memory_reserved(self.r.device) - before
        log.info("%s", self.describe())

    def describe(self) -> str:
        if self.layers is not None:
            return "decode step's layers in one call to baton's CPU kernels"
        if not self.graphs:
            return f"decode step eager ({'padded to ' + ','.join(map(str, self.buckets)) if self.buckets else 'unpadded'})"
        return (f"decode step as CUDA graphs for {len(self.buckets)} batch sizes ({','.join(map(str, self.buckets))}) "
                f"x {self.r.num_layers + 1} pieces, captured in {self.capture_s:.1f} s, holding "
                f"{self.capture_bytes / 2 ** 20:.0f} MiB")

    def _run_piece(self, li: int, b: int) -> None:
        graphs = self.graphs.get(b)
        if graphs:
            graphs[li].replay()
        else:
            self._piece(li, b)

    # ---- the step ------------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.buckets else n

    @torch.no_grad()
    def step(self, tokens: list[int], cache: BatchKVCache) -> torch.Tensor:
        """One decode step of the cache's n rows, fed `tokens` (n,); returns their logits (n, V),
        a view valid until the next step."""
        r, n = self.r, len(tokens)
        b = self.bucket(n)
        self.ids[:n].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        step = cache.begin_step()                                              # positions, column, mask
        self.pos[:n].copy_(step.positions)
        if self.layers is not None:
            h = self.h[:n]
            h.copy_(r.embed(self.ids[:n]))                                     # (n, hidden)
            self.layers(h, cache, step, *r.rope(self.pos[:n]))
            cache.end_step()
            return r.logits(h)
        for li in range(r.num_layers + 1):
            self._run_piece(li, b)
            if li == r.num_layers:
                break
            self.attn[:n] = r.batch_attention(li, cache, step, self.q[:n], self.k[:n], self.v[:n])
        cache.end_step()
        return self.logits[:n]
