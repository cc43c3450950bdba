"""BATON's running batch: one dense, left-padded K/V tensor that queries join and leave, allocated
once, and the one record of which query holds which row.

Layout: buf (L, 2, rows, Hkv, cols, D), sized at start (`kv_capacity`) and never reallocated, so
every address a captured CUDA graph or a registered transfer buffer holds stays valid. Row r holds
its `lens[r]` tokens right-aligned in columns [end - lens[r], end), so every row writes its next
token into the same column `end` and one decode step is a single dense batched forward (vector
shaping). Columns [start, end) are the ones some row still needs; the attention mask hides the rest.

The batch is addressed by key (a request id), never by row: rows move (a leaving row's hole is
filled by the last row), and the only code that knows where a key's row is lives here.
- join: a newcomer's K/V goes right-aligned into the next free row; if it is longer than the batch,
  `start` moves left (widening), or the window moves right in place when there is no room left of it,
  to twice the newcomer's length (`_headroom`): the newcomers after it, as long or a little longer, then
  find room without a copy (a burst of prompts of growing lengths moved it at every join, 40-350 ms each).
- leave: the last row is moved into the freed row (a one-row copy); `start` moves right past
  columns no row needs any more (trimming, no copy).
- step: `begin_step` gives the step's inputs (positions, column, mask), the model writes column
  `end` through `layer_views`, `end_step` commits it. When `end` reaches the last column, the window
  is moved back left in place (a compaction: one copy of the live window every `cols - end` steps).

Each row's token count is kept twice, both here: `Row.length` on the host (bookkeeping) and `pos` on the
device (positions and the mask are built from it, so a step reads no host list and never syncs).
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Row:
    """One row of the batch: who holds it and how many tokens of K/V it holds."""
    key: Hashable           # the holder's request id
    occupant: Any           # the holder (the engine's Request)
    length: int


@dataclass(frozen=True)
class StepInputs:
    """What one decode step of the batch reads, for its n rows."""
    positions: torch.Tensor     # (n,) position id of each row's new token (a device view, no sync)
    col: int                    # the step's column in `layer_views` (its K/V is written there)
    mask: torch.Tensor          # (n, 1, 1, T) additive: 0 on a row's own tokens and the step's column
    lengths: torch.Tensor       # (n,) columns each row attends over: its own tokens and the step's, right-aligned


class BatchKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_rows: int = 32, max_cols: int = 1024):
        self.shape_lhd = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_rows, self.max_cols = max_rows, max_cols
        self.rows: list[Row] = []              # row r of buf is rows[r]
        self._row: dict[Hashable, int] = {}    # key -> its row index
        self.start = self.end = 0
        self.moves = 0                     # how often the live window was copied (moved right, or compacted)
        self.compactions = 0               # how often the window was moved back left to step on
        # Zeros, not empty: masked columns still meet V in the attention matmul, and 0 * NaN is NaN.
        self.buf = torch.zeros(num_layers, 2, max_rows, num_kv_heads, max_cols, head_dim, dtype=dtype,
                               device=self.device)
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=self.device)   # (rows,) == lens, on the device

    # ---- shape bookkeeping -------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def occupants(self) -> list[Any]:
        """Who holds each row, in row order."""
        return [r.occupant for r in self.rows]

    @property
    def lens(self) -> list[int]:
        """Tokens held by each row, in row order."""
        return [r.length for r in self.rows]

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

    def _headroom(self, longest: int) -> int:
        """Where the window ends when it must move for a row of `longest` tokens: room for rows up to
        twice as long, within the first half of the columns (the rest is for stepping)."""
        return max(longest, min(2 * longest, self.max_cols // 2))

    def _move(self, new_end: int) -> None:
        """Move the live window [start, end) so that it ends at `new_end`, in place (same buffer), one
        layer at a time: a copy of the whole window is fresh memory, whose page faults cost more than
        the copy (148 MB: 350 ms against 12 ms for the copy back, measured on a 2-core Xeon)."""
        n, w = self.num_rows, self.width
        if n and new_end != self.end:
            self.moves += 1
            for layer in self.buf:                                 # (2, rows, Hkv, cols, D)
                window = layer[:, :n, :, self.start:self.end].clone()
                layer[:, :n, :, new_end - w:new_end] = window
        self.start, self.end = new_end - w, new_end

    # ---- joining and leaving --------------------------------------------------------------
    def reserve(self, rows: int, longest: int) -> None:
        """Room for `rows` rows in all and a newcomer of `longest` tokens: the window moves right at
        most once for a group of newcomers, not once per newcomer."""
        if rows > self.max_rows:
            raise RuntimeError(f"{rows} rows do not fit a batch of {self.max_rows}")
        if not self.fits(longest):
            raise ValueError(f"a row of {longest} tokens does not fit the cache's {self.max_cols} columns")
        if longest > self.end:
            self._move(self._headroom(longest))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._row

    def get(self, key: Hashable) -> Any:
        """The occupant of key's row, or None."""
        row = self._row.get(key)
        return None if row is None else self.rows[row].occupant

    def join(self, key: Hashable, occupant: Any, kv: torch.Tensor) -> None:
        """Embed one prefilled query's K/V (L, 2, Hkv, P, D) as a new row held by `occupant`."""
        L, H, D = self.shape_lhd
        P = kv.shape[3]
        if kv.shape != (L, 2, H, P, D):
            raise ValueError(f"K/V shape {tuple(kv.shape)} does not match the model ({L}, 2, {H}, P, {D})")
        if key in self._row:
            raise ValueError(f"{key!r} already holds a row")
        if self.num_rows >= self.max_rows:
            raise RuntimeError("batch is full")
        self.reserve(self.num_rows + 1, P)
        row = self.num_rows
        self.start = min(self.start, self.end - P)
        self.buf[:, :, row, :, self.end - P:self.end] = kv.to(device=self.device, dtype=self.dtype)
        self.pos[row] = P
        self.rows.append(Row(key, occupant, P))
        self._row[key] = row

    def leave(self, key: Hashable) -> Any:
        """Drop key's row, if it holds one; returns its occupant (or None). The last row moves into
        its place, so no hole is left for a step to compute."""
        row = self._row.pop(key, None)
        if row is None:
            return None
        leaving, last = self.rows[row], self.num_rows - 1
        if row != last:
            self.buf[:, :, row, :, self.start:self.end] = self.buf[:, :, last, :, self.start:self.end]
            self.pos[row] = self.pos[last]
            self.rows[row] = self.rows[last]
            self._row[self.rows[row].key] = row
        self.rows.pop()
        self._trim()
        return leaving.occupant

    def _trim(self) -> None:
        """Forget columns that no remaining row needs (the longest row may have left); an empty
        batch starts again at column 0."""
        if self.rows:
            self.start = self.end - max(r.length for r in self.rows)
        else:
            self.start = self.end = 0

    # ---- one decode step -------------------------------------------------------------------
    def begin_step(self) -> StepInputs:
        """The inputs of a step of every row; makes room for its column (compacting the window
        back left when it reached the buffer's end)."""
        if self.end >= self.max_cols:
            self._move(self._headroom(self.width))
            self.compactions += 1
        positions = self.pos[:self.num_rows]                          # (n,) == lens, on the device
        cols = torch.arange(self.start, self.end + 1, device=self.device)
        hidden = cols[None, :] < (self.end - positions)[:, None]      # (n, T): a row's padding
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
        return StepInputs(positions, self.end - self.start, mask[:, None, None, :], positions + 1)

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer over the live rows and columns [start, end + 1): (n, Hkv, T, D) views."""
        n = self.num_rows
        return (self.buf[layer, 0, :n, :, self.start:self.end + 1],
                self.buf[layer, 1, :n, :, self.start:self.end + 1])

    def end_step(self) -> None:
        """Every row now holds the step's column too."""
        self.end += 1
        self.pos[:self.num_rows] += 1
        for r in self.rows:
            r.length += 1

    def row_kv(self, key: Hashable) -> torch.Tensor:
        """key's K/V (L, 2, Hkv, len, D), a copy (for inspection: migration re-prefills instead)."""
        row = self._row[key]
        return self.buf[:, :, row, :, self.end - self.rows[row].length:self.end].clone()
