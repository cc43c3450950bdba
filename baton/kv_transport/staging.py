"""The decode worker's staging buffers for one-sided reads (nixl.py): registered once with the
NIXL agent, reused once nothing refers to them any more (their storage's use count, so no view of a
buffer can outlive a reuse), pages touched when allocated rather than inside a read."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

POOL_BYTES = 1 << 30           # registered staging memory a decode worker keeps for reuse, at most
ROUND_BYTES = 1 << 20          # staging buffers are sized in whole MiB, so near sizes share them


@dataclass
class _Staged:
    buf: torch.Tensor             # uint8, registered
    reg: object
    base_uses: int = field(default=0)

    def busy(self) -> bool:
        return _uses(self.buf) > self.base_uses


def _uses(t: torch.Tensor) -> int:
    """Tensors sharing t's storage (views included), t among them."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class StagingPool:
    """Registered buffers the decode worker reads K/V into, reused once nothing refers to them."""

    def __init__(self, agent, lock: threading.Lock, device: torch.device, max_bytes: int = POOL_BYTES):
        self.agent, self.lock, self.device, self.max_bytes = agent, lock, torch.device(device), max_bytes
        self.staged: list[_Staged] = []

    def take(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """A registered uint8 buffer of nbytes, and what to call once the read into it is over."""
        with self.lock:
            free = [s for s in self.staged if s.buf.numel() >= nbytes and not s.busy()]
            if free:
                return min(free, key=lambda s: s.buf.numel()).buf[:nbytes], lambda: None
        size = -(-nbytes // ROUND_BYTES) * ROUND_BYTES
        buf = torch.zeros(size, dtype=torch.uint8, device=self.device)   # pages touched now, not in the read
        with self.lock:   # (the agent's lock: not held while the pages are touched)
            while self.staged and self._bytes() + size > self.max_bytes and self._evict_one():
                pass
            reg = self.agent.register_memory(buf)
            if self._bytes() + size <= self.max_bytes:
                s = _Staged(buf, reg)
                s.base_uses = _uses(buf)
                self.staged.append(s)
                return buf[:nbytes], lambda: None
        # over the pool's size: a buffer for this transfer alone, unregistered after its read
        return buf[:nbytes], lambda: self._deregister(reg)

    def _bytes(self) -> int:
        return sum(s.buf.numel() for s in self.staged)

    def _evict_one(self) -> bool:
        """Under self.lock: drop the largest free buffer; False if all are busy."""
        free = [s for s in self.staged if not s.busy()]
        if not free:
            return False
        s = max(free, key=lambda s: s.buf.numel())
        self.staged.remove(s)
        self.agent.deregister_memory(s.reg)
        return True

    def _deregister(self, reg) -> None:
        with self.lock:
            self.agent.deregister_memory(reg)

    def held_bytes(self) -> int:
        with self.lock:
            return sum(s.buf.numel() for s in self.staged if s.busy())

    def close(self) -> None:
        with self.lock:
            for s in self.staged:
                self.agent.deregister_memory(s.reg)
            self.staged.clear()
