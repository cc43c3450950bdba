"""The colocated worker: one process serves both the Decode and the Prefill role on one device.

Where prefill and decode would share a device (a CPU-only node, one GPU), two processes would
split its cores or its memory bandwidth and ship K/V between them. Here a Prefill call that
names this worker's own address hands the prompt to its engine instead: the engine prefills
it in chunks inside its decode steps (one pass over the weights) and embeds the K/V into the
running batch by vector shaping, in memory. A Prefill for another decode worker is computed
and pushed over gRPC, as a dedicated prefill worker would.
"""
from __future__ import annotations

from baton.request import Request
from decode_service.worker import DecodeWorker
from prefill_service.worker import PrefillResult, PrefillWorker


class ColocatedPrefill:
    """The Prefill role of a colocated worker (the interface PrefillServicer drives)."""

    def __init__(self, decode: DecodeWorker, remote: PrefillWorker, own_address: str):
        self.decode, self.remote, self.own_address = decode, remote, own_address
        self.handed = 0                      # prompts handed to the own batch in memory

    @property
    def load(self) -> int:
        return self.remote.load

    @property
    def active(self) -> set[str]:
        return self.remote.active

    @property
    def stats(self) -> dict:
        return {**self.remote.stats, "prefills": self.remote.stats["prefills"] + self.handed}

    def prefill(self, req: Request, decode_address: str, attempt: int = 0) -> PrefillResult:
        if decode_address != self.own_address:
            return self.remote.prefill(req, decode_address, attempt)
        self.remote.check(req)
        self.decode.admit_prompt(req)
        self.handed += 1
        return PrefillResult(first_token=0, num_tokens=len(req.all_ids), kv_bytes=0, compute_s=0.0, transfer_s=0.0)

    def cancel_transfer(self, request_id: str, address: str | None = None) -> None:
        """Stop a push to another decode worker (one to this worker's own batch is in memory)."""
        self.remote.cancel_transfer(request_id, address)

    def abort(self, request_id: str, attempt: int = 0) -> bool:
        return any([self.remote.abort(request_id, attempt), self.decode.abort(request_id)])   # both, whatever the first says
