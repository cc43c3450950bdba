"""The Prefill role of a colocated worker (one process serving Decode and Prefill on one device): a
Prefill call that names this worker's own address hands the prompt to its engine, which prefills it in
chunks inside its decode steps and puts the K/V into the running batch by vector shaping, in memory; a
Prefill for another decode worker is computed and pushed over gRPC, as a dedicated prefill worker would.
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
    def transport(self):
        return self.remote.transport

    @property
    def stats(self) -> dict:
        return {**self.remote.stats, "prefills": self.remote.stats["prefills"] + self.handed}

    def prefix_stats(self) -> dict:
        """The engine's prefix cache (the remote prefills share it), as the loop last published."""
        return self.decode.loop.stats

    def prefill(self, req: Request, decode_address: str, attempt: int = 0) -> PrefillResult:
        if decode_address != self.own_address:
            return self.remote.prefill(req, decode_address, attempt)
        self.remote.check(req)
        self.decode.admit_prompt(req)
        self.handed += 1
        return PrefillResult(num_tokens=req.num_tokens, kv_bytes=0, compute_s=0.0, transfer_s=0.0)

    def cancel_transfer(self, request_id: str, address: str | None = None) -> None:
        """Stop a push to another decode worker (one to this worker's own batch is in memory)."""
        self.remote.cancel_transfer(request_id, address)

    def abort(self, request_id: str, attempt: int = 0) -> bool:
        return any([self.remote.abort(request_id, attempt), self.decode.abort(request_id, attempt)])   # both, whatever the first says
