"""BATON's batch KV cache: one dense, left-padded tensor that queries join and leave.

Layout: buf (L, 2, rows, Hkv, cols, D). Row r holds its `lens[r]` tokens right-aligned
in columns [end - lens[r], end), so every row writes its next token into the same column
`end` and one decode step is a single dense batched forward (vector shaping). Columns
[start, end) are the ones some row still needs; the attention mask hides the rest.

- insert: a newcomer's K/V goes right-aligned into a free row; if it is longer than the
  batch, `start` moves left (widening) — into preallocated slack, so no copy.
- reserve: room for a whole group of newcomers in at most one reallocation.
- remove: the last row is moved into the freed row (a one-row copy); `start` moves right
  past columns no row needs any more (trimming, no copy).
- step: writes one column; the buffer is reallocated only when the slack runs out, with
  geometric growth, so the amortised cost per step is O(one column).
"""
from __future__ import annotations

import torch


class BatchKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_rows: int = 32, col_chunk: int = 64):
        self.shape_lhd = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_rows = max_rows
        self.col_chunk = col_chunk
        self.lens: list[int] = []          # tokens held per row, row order
        self.start = self.end = 0
        self.relayouts = 0                 # how often the buffer was reallocated (for tests/metrics)
        self.buf = self._alloc(min(max_rows, 4), col_chunk)

    # ---- shape bookkeeping -------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.lens)

    @property
    def width(self) -> int:
        """Columns currently attended over (the batch's padded sequence length)."""
        return self.end - self.start

    def nbytes(self) -> int:
        """Bytes allocated (the buffer keeps its peak size so later batches reuse it)."""
        return self.buf.numel() * self.buf.element_size()

    def used_bytes(self) -> int:
        """Bytes of the live rows over the live columns: 0 when the batch is empty."""
        L, H, D = self.shape_lhd
        return self.num_rows * self.width * L * 2 * H * D * self.buf.element_size()

    def _alloc(self, rows: int, cols: int) -> torch.Tensor:
        L, H, D = self.shape_lhd
        # Zeros, not empty: masked columns still meet V in the attention matmul, and 0 * NaN is NaN.
        # (Tried: empty + zeroing only the padding insert() exposes; the gRPC decode worker got
        # slower, TTFT p50 8.5 -> 15 s in `baton bench --systems baton_grpc`, cause not found.)
        return torch.zeros(L, 2, rows, H, cols, D, dtype=self.dtype, device=self.device)

    def _relayout(self, rows: int, left: int, right: int) -> None:
        """Reallocate so there are `rows` rows, `left` free columns before start, `right` after end."""
        cols = left + self.width + right
        new = self._alloc(rows, cols)
        n = self.num_rows
        if n:
            new[:, :, :n, :, left:left + self.width] = self.buf[:, :, :n, :, self.start:self.end]
        self.buf = new
        self.start, self.end = left, left + self.width
        self.relayouts += 1

    # ---- insertion and removal ------------------------------------------------------------
    def reserve(self, rows: int, longest: int) -> None:
        """Room for `rows` rows in all and a newcomer of `longest` tokens, in at most one
        reallocation: a group of newcomers then goes in without the buffer growing row by row."""
        rows_cap, cols = self.buf.shape[2], self.buf.shape[4]
        if rows > rows_cap:  # geometric, like insert(): arrivals one or two at a time stay amortised O(1)
            rows = max(rows, 2 * rows_cap)
        rows = min(self.max_rows, rows)
        if self.num_rows == 0:
            if rows > rows_cap or longest + self.col_chunk > cols:  # nothing to keep: just allocate
                self.buf = self._alloc(max(rows, rows_cap), max(cols, longest + 2 * self.col_chunk))
                self.relayouts += 1
            self.start = self.end = longest  # the group fits left of the window, slack stays right
            return
        need_left = max(0, longest - self.width)
        if rows > rows_cap or need_left > self.start:
            slack = max(self.col_chunk, self.width // 2)
            self._relayout(max(rows, rows_cap), need_left + slack, slack)

    def insert(self, kv: torch.Tensor) -> int:
        """Embed one prefilled query's K/V (L, 2, Hkv, P, D) as a new row; returns the row index."""
        L, H, D = self.shape_lhd
        P = kv.shape[3]
        if kv.shape != (L, 2, H, P, D):
            raise ValueError(f"K/V shape {tuple(kv.shape)} does not match the model ({L}, 2, {H}, P, {D})")
        if self.num_rows >= self.max_rows:
            raise RuntimeError("batch is full")
        if self.num_rows == 0 and not (P <= self.start and self.buf.shape[4] - self.end >= self.col_chunk):
            # An empty batch keeps its buffer; centre the window so both sides have slack.
            self.start = self.end = self.buf.shape[4] // 2
        rows_cap = self.buf.shape[2]
        need_left = max(0, P - self.width)
        if self.num_rows == rows_cap or need_left > self.start:
            rows = min(self.max_rows, 2 * rows_cap) if self.num_rows == rows_cap else rows_cap
            slack = max(self.col_chunk, self.width // 2)
            self._relayout(rows, need_left + slack, slack)
        row = self.num_rows
        self.start = min(self.start, self.end - P)
        self.buf[:, :, row, :, self.end - P:self.end] = kv.to(device=self.device, dtype=self.dtype)
        self.lens.append(P)
        return row

    def remove(self, row: int) -> int | None:
        """Drop a row. The last row moves into its place; returns that row's old index (or None)."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            self.buf[:, :, row, :, self.start:self.end] = self.buf[:, :, last, :, self.start:self.end]
            self.lens[row] = self.lens[last]
            moved = last
        self.lens.pop()
        self._trim()
        return moved

    def _trim(self) -> None:
        """Forget columns that no remaining row needs (the longest row may have left)."""
        self.start = self.end - max(self.lens) if self.lens else self.end

    # ---- one decode step -------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """(n,) position id of each row's next token = tokens it already holds."""
        return torch.tensor(self.lens, dtype=torch.long, device=self.device)

    def append_column(self) -> int:
        """Make room for this step's column; returns its absolute index (== end)."""
        if self.end >= self.buf.shape[4]:
            slack = max(self.col_chunk, self.width)  # geometric growth: amortised O(1) per step
            self._relayout(self.buf.shape[2], min(self.start, self.col_chunk), slack)
        return self.end

    def attention_mask(self) -> torch.Tensor:
        """(n, 1, 1, width + 1) additive, in the cache dtype, added to the attention scores: 0 where
        row r sees its own tokens and this step's column, -inf on its padding."""
        cols = torch.arange(self.start, self.end + 1, device=self.device)
        first = self.end - self.positions()
        hidden = cols[None, :] < first[:, None]
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
        return mask[:, None, None, :]

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer over the live rows and columns [start, end + 1): (n, Hkv, T, D) views."""
        n = self.num_rows
        return (self.buf[layer, 0, :n, :, self.start:self.end + 1],
                self.buf[layer, 1, :n, :, self.start:self.end + 1])

    def commit_step(self) -> None:
        self.end += 1
        self.lens = [x + 1 for x in self.lens]

    def row_kv(self, row: int) -> torch.Tensor:
        """One row's K/V (L, 2, Hkv, len, D), a copy (for inspection: migration re-prefills instead)."""
        return self.buf[:, :, row, :, self.end - self.lens[row]:self.end].clone()
