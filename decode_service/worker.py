"""The decode worker's bookkeeping, independent of the transport.

A query reaches a decode worker from two sides that race: its K/V (pushed by a prefill
worker) and the router's `attach` that streams its tokens back. Whichever comes first
waits for the other, each for a bounded lease; an abort may come at any point and wins.
Rules (one place frees a slot):
- K/V that nobody attaches to within `lease_s` is aborted: its row or queue slot is freed.
- An attach that no K/V reaches within its timeout ends with DEADLINE_EXCEEDED (the service asks
  `try_attach` in short waits, sending keep-alives between); the router then aborts it everywhere.
- An abort before the K/V arrives leaves a tombstone, so the late K/V is refused, not run.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from baton import grammar
from baton.engine import PrefillOutput
from baton.engine_loop import EngineLoop, TokenStream
from baton.errors import AlreadyExists, InvalidArgument, NotFound
from baton.request import Request
from baton.sampling import SamplingParams


@dataclass
class _Slot:
    stream: TokenStream
    created_s: float
    attached: bool = False


class DecodeWorker:
    def __init__(self, loop: EngineLoop, lease_s: float = 30.0, tombstone_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        self.loop, self.clock = loop, clock     # clock: leases and tombstones age by it (tests pass a fake)
        self.lease_s, self.tombstone_s = lease_s, tombstone_s
        self.slots: dict[str, _Slot] = {}
        self.tombstones: dict[str, float] = {}     # request_id -> when it was aborted
        self.cond = threading.Condition()
        self.transfers = {"count": 0, "bytes": 0, "seconds": 0.0}
        runner = loop.engine.runner
        self.kv_shape = (runner.num_layers, 2, runner.num_kv_heads, runner.head_dim)
        self.dtype = runner.dtype
        self.vocab_size = runner.vocab_size
        self.max_len = loop.engine.model.max_len
        self.grammars = loop.engine.model.grammars

    # ---- K/V side --------------------------------------------------------------------------
    def check_header(self, request_id: str, dtype: torch.dtype, shape: tuple[int, ...],
                     num_tokens: int, params: SamplingParams) -> None:
        """Refuse a transfer before any bytes are read: wrong model shape, dtype, or a dead id."""
        L, two, H, D = self.kv_shape
        if not request_id:
            raise InvalidArgument("request_id must not be empty")
        if dtype != self.dtype:
            raise InvalidArgument(f"K/V dtype {dtype} does not match this worker's model dtype {self.dtype}")
        if len(shape) != 5 or shape[:3] != (L, two, H) or shape[4] != D or shape[3] < 1:
            raise InvalidArgument(f"K/V shape {tuple(shape)} does not match (layers={L}, 2, kv_heads={H}, P>=1, head_dim={D})")
        if shape[3] != num_tokens:
            raise InvalidArgument(f"K/V holds {shape[3]} tokens but the request has {num_tokens}")
        if num_tokens >= self.max_len:
            raise InvalidArgument(f"{num_tokens} tokens do not fit the model context of {self.max_len}")
        grammar.check_request(params, self.vocab_size, self.grammars)
        with self.cond:
            if request_id in self.tombstones:
                raise NotFound(f"request {request_id!r} was aborted")
            if request_id in self.slots:
                raise AlreadyExists(f"request {request_id!r} is already on this worker")

    def admit(self, req: Request, pre: PrefillOutput, transfer_s: float = 0.0) -> None:
        """A complete, validated transfer: the request joins the batch's queue."""
        self._admit(req, lambda: self.loop.submit_prefilled(req, pre))
        with self.cond:
            self.transfers["count"] += 1
            self.transfers["bytes"] += pre.kv.numel() * pre.kv.element_size()
            self.transfers["seconds"] += transfer_s

    def admit_prompt(self, req: Request) -> None:
        """A prompt to prefill in this worker's own steps (colocated): its K/V goes straight from
        the chunked prefill into the batch, in memory."""
        self._admit(req, lambda: self.loop.submit(req))

    def _admit(self, req: Request, submit) -> None:
        with self.cond:
            if req.request_id in self.tombstones:
                raise NotFound(f"request {req.request_id!r} was aborted")
            if req.request_id in self.slots:
                raise AlreadyExists(f"request {req.request_id!r} is already on this worker")
            self.slots[req.request_id] = _Slot(submit(), self.clock())   # QueueFull / duplicates raise here
            self.cond.notify_all()

    # ---- router side -------------------------------------------------------------------------
    def try_attach(self, request_id: str, wait_s: float) -> TokenStream | None:
        """The request's token stream if its K/V arrives within wait_s, else None (ask again)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self.cond:
            while request_id not in self.slots:
                if request_id in self.tombstones:
                    raise NotFound(f"request {request_id!r} was aborted")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))
            slot = self.slots[request_id]
            if slot.attached:
                raise AlreadyExists(f"request {request_id!r} already has a listener")
            slot.attached = True
            return slot.stream

    def release(self, request_id: str) -> None:
        """The listener is done with the request (finished, or it went away: then abort)."""
        with self.cond:
            self.slots.pop(request_id, None)
        self.loop.abort(request_id)  # a no-op for a finished request

    def abort(self, request_id: str) -> bool:
        """Drop the request here, now or when its K/V arrives; True if it was here."""
        with self.cond:
            self.tombstones[request_id] = self.clock()
            found = self.slots.pop(request_id, None) is not None
            self.cond.notify_all()
        self.loop.abort(request_id)
        return found

    def reap(self) -> int:
        """Abort K/V nobody attached to within the lease; forget old tombstones. Returns aborts."""
        now = self.clock()
        with self.cond:
            stale = [rid for rid, s in self.slots.items() if not s.attached and now - s.created_s > self.lease_s]
            for rid in [r for r, t in self.tombstones.items() if now - t > self.tombstone_s]:
                del self.tombstones[rid]
        for rid in stale:
            self.abort(rid)
        return len(stale)
