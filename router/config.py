"""The router's configuration: one frozen object, built from flags in router/main.py."""
from __future__ import annotations

from dataclasses import dataclass

from baton import grpc_util


@dataclass(frozen=True)
class RouterConfig:
    max_queue: int = 256                 # accepted requests not yet decoding
    max_running: int = 1024              # concurrent streams
    default_max_new_tokens: int | None = None   # None: what the context leaves after the prompt (vLLM's)
    prefill_timeout_s: float = 120.0
    attach_timeout_s: float = 130.0
    max_prefill_attempts: int = 3
    max_migrations: int = 3
    # A decode worker that sends nothing on a request's stream (no token, no keep-alive) for this
    # long is failed for that request, which migrates; it asks for a keep-alive 4x as often.
    worker_silence_s: float = 5.0
    # With no live worker for a role, wait this long for one before UNAVAILABLE: a worker marked
    # dead by one failed call is back at the next health poll (1 s), a restarted one re-registers.
    worker_wait_s: float = 2.0
    auth_token: str | None = None
    max_message_bytes: int = grpc_util.MAX_MESSAGE_BYTES

    @property
    def handler_threads(self) -> int:
        """Threads that run the router's calls: one per running stream, and room for the short calls."""
        return self.max_running + 32

    @property
    def keepalive_s(self) -> float:
        return min(1.0, self.worker_silence_s / 4)
