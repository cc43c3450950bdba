"""BATON's batch KV cache: one dense, left-padded tensor that queries join and leave, allocated once.

Layout: buf (L, 2, rows, Hkv, cols, D), sized at start (`kv_capacity`) and never reallocated, so
every address a captured CUDA graph or a registered transfer buffer holds stays valid. Row r holds
its `lens[r]` tokens right-aligned in columns [end - lens[r], end), so every row writes its next
token into the same column `end` and one decode step is a single dense batched forward (vector
shaping). Columns [start, end) are the ones some row still needs; the attention mask hides the rest.

- insert: a newcomer's K/V goes right-aligned into a free row; if it is longer than the batch,
  `start` moves left (widening), or the window moves right in place when there is no room left of it.
- remove: the last row is moved into the freed row (a one-row copy); `start` moves right past
  columns no row needs any more (trimming, no copy).
- step: writes column `end`; when `end` reaches the last column, the window is moved back to
  column 0 in place (a compaction: one copy of the live window every `cols - width` steps).

Each row's token count is kept twice: `lens` on the host (bookkeeping) and `pos` on the device
(positions and the mask are built from it, so a step reads no host list and never syncs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_DEFAULT_BYTES = 4 << 30     # as vLLM's CPU backend (VLLM_CPU_KVCACHE_SPACE=4)


@dataclass(frozen=True)
class KVCapacity:
    rows: int
    cols: int          # columns of the buffer: the longest row it can hold, plus room to step before compacting
    max_len: int       # prompt + output tokens a request may reach
    nbytes: int

    def describe(self) -> str:
        return (f"batch K/V cache: {self.nbytes / 2 ** 30:.2f} GiB, {self.rows} rows x {self.cols} columns "
                f"({self.rows * self.cols:,} token slots); a request holds at most {self.max_len:,} tokens")


def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V of one token, all layers."""
    return num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize


def step_slack(max_len: int) -> int:
    """Columns beyond the longest row: how many steps run between two compactions at worst."""
    return max(16, min(256, max_len // 8))


def kv_capacity(rows: int, per_token: int, model_max_len: int, *, max_model_len: int = 0, budget: int = 0,
                device: torch.device | str = "cpu", gpu_memory_utilization: float = 0.9) -> KVCapacity:
    """How many columns the batch cache gets, and so the longest request it admits.

    `budget` (bytes, --kv-cache-memory) when given; otherwise what the device allows: on a GPU the
    share `gpu_memory_utilization` of its memory less what is already allocated (the weights), on a
    CPU 4 GiB (vLLM's default); never more than the model's context needs. A request's length is
    capped by the model, by `max_model_len` when set, and by what fits; a `max_model_len` that does
    not fit is an error that says what to change, as vLLM's is."""
    if max_model_len > model_max_len:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context of {model_max_len} tokens")
    want = max_model_len or model_max_len
    full = want + step_slack(want)                       # columns that hold the longest request comfortably
    if not budget:
        device = torch.device(device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            budget = max(0, int(total * gpu_memory_utilization) - torch.cuda.memory_reserved(device))
        else:
            budget = CPU_DEFAULT_BYTES
    cols = min(budget // (rows * per_token), full)
    max_len = want if cols == full else cols - step_slack(cols)
    if max_len < 16 or (max_model_len and max_len < max_model_len):
        raise ValueError(
            f"the batch K/V cache does not fit: {rows} rows of {want} tokens need "
            f"{rows * full * per_token / 2 ** 30:.2f} GiB, the budget is {budget / 2 ** 30:.2f} GiB; lower "
            f"--max-model-len or --max-num-seqs, or raise --kv-cache-memory (or --gpu-memory-utilization)")
    return KVCapacity(rows, cols, max_len, rows * cols * per_token)


class BatchKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_rows: int = 32, max_cols: int = 1024):
        self.shape_lhd = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_rows, self.max_cols = max_rows, max_cols
        self.lens: list[int] = []          # tokens held per row, row order
        self.start = self.end = 0
        self.compactions = 0               # how often the window was moved back to column 0
        # Zeros, not empty: masked columns still meet V in the attention matmul, and 0 * NaN is NaN.
        self.buf = torch.zeros(num_layers, 2, max_rows, num_kv_heads, max_cols, head_dim, dtype=dtype,
                               device=self.device)
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)   # (rows,) == lens, on the device

    # ---- shape bookkeeping -------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.lens)

    @property
    def width(self) -> int:
        """Columns currently attended over (the batch's padded sequence length)."""
        return self.end - self.start

    def nbytes(self) -> int:
        """Bytes allocated (once, at start)."""
        return self.buf.numel() * self.buf.element_size()

    def used_bytes(self) -> int:
        """Bytes of the live rows over the live columns: 0 when the batch is empty."""
        return self.num_rows * self.width * token_bytes(*self.shape_lhd, self.dtype)

    def fits(self, tokens: int) -> bool:
        """Whether a row of this many tokens can be held (and step once)."""
        return tokens < self.max_cols

    def _move(self, new_end: int) -> None:
        """Move the live window [start, end) so that it ends at `new_end`, in place (same buffer)."""
        n, w = self.num_rows, self.width
        if n and new_end != self.end:
            window = self.buf[:, :, :n, :, self.start:self.end].clone()
            self.buf[:, :, :n, :, new_end - w:new_end] = window
        self.start, self.end = new_end - w, new_end

    # ---- insertion and removal ------------------------------------------------------------
    def reserve(self, rows: int, longest: int) -> None:
        """Room for `rows` rows in all and a newcomer of `longest` tokens: the window moves right at
        most once for a group of newcomers, not once per newcomer."""
        if rows > self.max_rows:
            raise RuntimeError(f"{rows} rows do not fit a batch of {self.max_rows}")
        if not self.fits(longest):
            raise ValueError(f"a row of {longest} tokens does not fit the cache's {self.max_cols} columns")
        if longest > self.end:
            self._move(longest)

    def insert(self, kv: torch.Tensor) -> int:
        """Embed one prefilled query's K/V (L, 2, Hkv, P, D) as a new row; returns the row index."""
        L, H, D = self.shape_lhd
        P = kv.shape[3]
        if kv.shape != (L, 2, H, P, D):
            raise ValueError(f"K/V shape {tuple(kv.shape)} does not match the model ({L}, 2, {H}, P, {D})")
        if self.num_rows >= self.max_rows:
            raise RuntimeError("batch is full")
        self.reserve(self.num_rows + 1, P)
        row = self.num_rows
        self.start = min(self.start, self.end - P)
        self.buf[:, :, row, :, self.end - P:self.end] = kv.to(device=self.device, dtype=self.dtype)
        self.pos[row] = P
        self.lens.append(P)
        return row

    def remove(self, row: int) -> int | None:
        """Drop a row. The last row moves into its place; returns that row's old index (or None)."""
        last = self.num_rows - 1
        moved = None
        if row != last:
            self.buf[:, :, row, :, self.start:self.end] = self.buf[:, :, last, :, self.start:self.end]
            self.pos[row] = self.pos[last]
            self.lens[row] = self.lens[last]
            moved = last
        self.lens.pop()
        self._trim()
        return moved

    def _trim(self) -> None:
        """Forget columns that no remaining row needs (the longest row may have left); an empty
        batch starts again at column 0."""
        if self.lens:
            self.start = self.end - max(self.lens)
        else:
            self.start = self.end = 0

    # ---- one decode step -------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """(n,) position id of each row's next token = tokens it already holds (a device view)."""
        return self.pos[:self.num_rows]

    def append_column(self) -> int:
        """Make room for this step's column; returns its absolute index (== end)."""
        if self.end >= self.max_cols:
            self._move(self.width)
            self.compactions += 1
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
        self.pos[:self.num_rows] += 1
        self.lens = [x + 1 for x in self.lens]

    def row_kv(self, row: int) -> torch.Tensor:
        """One row's K/V (L, 2, Hkv, len, D), a copy (for inspection: migration re-prefills instead)."""
        return self.buf[:, :, row, :, self.end - self.lens[row]:self.end].clone()
