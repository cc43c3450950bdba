"""The batching schemes BATON is compared with, on the same model runner and kernels.

- `PaddedPrefillRunner`: iteration-level batching where newcomers are prefilled *inside*
  the batch step: the step runs every row over the newcomers' longest prompt, so running
  rows compute padding (the idle computation BATON removes).
- `SelectiveRunner` (Orca): iteration-level batching with selective batching: norms,
  projections and MLP run on the flattened tokens of all requests (prompt tokens of
  newcomers and one token of each running request); attention is split per request,
  each over its own K/V.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.engine.runner import ModelRunner


class PaddedPrefillRunner:
    """One left-padded batch with a per-column validity mask (rows may have holes)."""

    def __init__(self, runner: ModelRunner, max_rows: int, cols: int = 256):
        r = self.r = runner
        self.kv = torch.zeros(r.num_layers, 2, max_rows, r.num_kv_heads, cols, r.head_dim, dtype=r.dtype, device=r.device)
        self.valid = torch.zeros(max_rows, cols, dtype=torch.bool, device=r.device)
        self.lens: list[int] = []      # real tokens per row
        self.cols = 0                  # columns in use
        self.computed = self.useful = 0  # token slots computed vs real (idle fraction)

    @property
    def num_rows(self) -> int:
        return len(self.lens)

    def remove(self, row: int) -> int | None:
        last = self.num_rows - 1
        moved = None
        if row != last:
            self.kv[:, :, row, :, :self.cols] = self.kv[:, :, last, :, :self.cols]
            self.valid[row, :self.cols] = self.valid[last, :self.cols]
            self.lens[row] = self.lens[last]
            moved = last
        self.valid[last] = False
        self.lens.pop()
        if not self.lens:
            self.cols = 0
        return moved

    def _grow(self, cols: int) -> None:
        """Geometric growth (amortised O(1) per column), as the BATON cache does."""
        kv = torch.zeros(*self.kv.shape[:4], cols, self.kv.shape[5], dtype=self.kv.dtype, device=self.kv.device)
        kv[..., :self.cols, :] = self.kv[..., :self.cols, :]
        valid = torch.zeros(self.valid.shape[0], cols, dtype=torch.bool, device=self.valid.device)
        valid[:, :self.cols] = self.valid[:, :self.cols]
        self.kv, self.valid = kv, valid

    @torch.no_grad()
    def step(self, chunks: list[list[int]]) -> torch.Tensor:
        """chunks[r]: the new tokens of row r (existing rows first, then newcomers).
        Every row is padded on the left to the longest chunk. Returns logits (n, V) of each row's last token."""
        r = self.r
        n, T = len(chunks), max(len(c) for c in chunks)
        while self.num_rows < n:
            self.lens.append(0)
        if self.cols + T > self.valid.shape[1]:
            self._grow(2 * (self.cols + T))
        ids = torch.zeros(n, T, dtype=torch.long, device=r.device)
        new_valid = torch.zeros(n, T, dtype=torch.bool, device=r.device)
        pos = torch.zeros(n, T, dtype=torch.long, device=r.device)
        for i, c in enumerate(chunks):
            ids[i, T - len(c):] = torch.tensor(c, device=r.device)
            new_valid[i, T - len(c):] = True
            pos[i, T - len(c):] = torch.arange(self.lens[i], self.lens[i] + len(c), device=r.device)
            self.lens[i] += len(c)
        self.computed += n * T
        self.useful += sum(len(c) for c in chunks)
        c0, c1 = self.cols, self.cols + T
        self.valid[:n, c0:c1] = new_valid
        # (n, 1, T, c1): valid keys, causal inside the chunk; each query sees itself (no empty rows -> no NaN).
        causal = torch.ones(T, c1, dtype=torch.bool, device=r.device).tril(c0)
        diag = torch.arange(T, device=r.device)[:, None] + c0 == torch.arange(c1, device=r.device)[None, :]
        mask = ((self.valid[:n, None, :c1] & causal[None]) | diag[None])[:, None]
        h = r.embed(ids)                                                            # (n, T, hidden)
        rope = r.rope(pos)
        for li in range(r.num_layers):
            q, k, v = (x.transpose(1, 2) for x in r.qkv(li, h, rope))                 # (n, H, T, D)
            self.kv[li, 0, :n, :, c0:c1] = k
            self.kv[li, 1, :n, :, c0:c1] = v
            o = F.scaled_dot_product_attention(q, self.kv[li, 0, :n, :, :c1], self.kv[li, 1, :n, :, :c1],
                                               attn_mask=mask, scale=r.scale, enable_gqa=r.group > 1)
            h = r.attn_out_mlp(li, h, o.transpose(1, 2).reshape(n, T, -1))
        self.cols = c1
        return r.logits(h[:, -1])


class SelectiveRunner:
    """Orca's selective batching over per-request K/V caches (preallocated: no copy per step)."""

    def __init__(self, runner: ModelRunner, max_len: int):
        self.r, self.max_len = runner, max_len
        self.caches: dict[str, torch.Tensor] = {}   # id -> (L, 2, Hkv, capacity, D)
        self.lens: dict[str, int] = {}

    def reserve(self, rid, tokens: int) -> None:
        """A request's own cache, sized to its prompt + output (attention never reads past what is written)."""
        r = self.r
        self.caches[rid] = torch.empty(r.num_layers, 2, r.num_kv_heads, min(tokens, self.max_len), r.head_dim,
                                       dtype=r.dtype, device=r.device)
        self.lens[rid] = 0

    def remove(self, rid: str) -> None:
        self.caches.pop(rid, None)
        self.lens.pop(rid, None)

    @torch.no_grad()
    def step(self, work: list[tuple[str, list[int]]]) -> torch.Tensor:
        """work: (request id, its new tokens) — a whole prompt for a newcomer, one token otherwise.
        Returns logits (len(work), V) of each request's last new token."""
        r = self.r
        for rid, _ in work:
            if rid not in self.caches:
                self.reserve(rid, self.max_len)
        flat = [t for _, toks in work for t in toks]
        pos = torch.tensor([p for rid, toks in work for p in range(self.lens[rid], self.lens[rid] + len(toks))],
                           device=r.device)                                         # (N,)
        h = r.embed(torch.tensor(flat, device=r.device))                           # (N, hidden)
        rope = r.rope(pos)
        for li in range(r.num_layers):
            q, k, v = r.qkv(li, h, rope)                                           # linear on all tokens at once
            q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, N, D)
            outs, off = [], 0
            for rid, toks in work:                                                  # attention split per request
                c, start = len(toks), self.lens[rid]
                cache = self.caches[rid][li]
                cache[0, :, start:start + c] = k[0, :, off:off + c]
                cache[1, :, start:start + c] = v[0, :, off:off + c]
                o = F.scaled_dot_product_attention(q[:, :, off:off + c], cache[0, None, :, :start + c],
                                                   cache[1, None, :, :start + c], is_causal=c > 1 and start == 0,
                                                   scale=r.scale, enable_gqa=r.group > 1)
                outs.append(o)
                off += c
            o = torch.cat(outs, dim=2)                                             # (1, Hq, N, D)
            h = r.attn_out_mlp(li, h, o[0].transpose(0, 1).reshape(len(flat), -1))
        for rid, toks in work:
            self.lens[rid] += len(toks)
        ends = torch.tensor([sum(len(t) for _, t in work[:i + 1]) - 1 for i in range(len(work))], device=r.device)
        return r.logits(h[ends])
