"""Fault injection for tests: break every Nth K/V chunk or worker call, off unless configured.

The K/V faults wrap a worker's transport from outside (`wrap_transport`, installed where the
worker is built when faults are configured); the transports themselves know nothing of them.

As vLLM drops K/V at random with a connector and fails every Nth network operation, a worker
started with

    BATON_FAULTS="kv_drop:7,kv_truncate:11,kv_corrupt:13,kv_duplicate:17,kv_stall:19,attach_fail:23"

breaks the 7th, 14th, ... K/V chunk it sends by dropping it, and so on. The environment is read
once, at the first use in the process. Kinds, and where they fire:
- prefill side, per K/V data chunk sent (the grpc transport): kv_drop, kv_truncate (half the bytes),
  kv_corrupt (one byte flipped), kv_duplicate (sent twice), kv_stall (waits past the transfer's
  deadline, which then ends it with DEADLINE_EXCEEDED). A transport that sends no chunks (nixl: the
  decode worker reads a registered region) has one occurrence per transfer, where only kv_stall
  applies: the call stays open past its deadline after the read. The byte faults have no
  counterpart in a one-sided read, whose integrity is the fabric's;
- prefill_fail: the Nth Prefill call fails with UNAVAILABLE;
- decode side: attach_fail / transfer_fail, the Nth Attach / TransferKV fails with UNAVAILABLE.
BATON_FAULTS_SEED seeds which byte is flipped and where a chunk is cut (default 0).
BATON_FAULTS_TRANSFER_TIMEOUT_S, with faults on, replaces the prefill side's K/V transfer
deadline (30 s), so that a stall need not last half a minute in a test.
Each worker's Stats reports how many faults of each kind fired (`faults_fired`).
"""
from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator

from baton.errors import Unavailable

log = logging.getLogger(__name__)
KV_KINDS = ("kv_drop", "kv_truncate", "kv_corrupt", "kv_duplicate", "kv_stall")
CALL_KINDS = ("prefill_fail", "attach_fail", "transfer_fail")
KINDS = KV_KINDS + CALL_KINDS


class Faults:
    """Counts the occurrences of each fault's spot; `fire(kind)` is true on every Nth."""

    def __init__(self, every: dict[str, int] | None = None, seed: int = 0, transfer_timeout_s: float | None = None):
        every = dict(every or {})
        for kind, n in every.items():
            if kind not in KINDS or n < 1:
                raise ValueError(f"fault {kind}:{n}: kinds are {', '.join(KINDS)}, each every N >= 1")
        self.every, self.transfer_timeout_s = every, transfer_timeout_s
        self.rng = random.Random(seed)
        self.seen = {k: 0 for k in every}
        self.fired = {k: 0 for k in every}
        self.lock = threading.Lock()

    @classmethod
    def from_env(cls, env=os.environ) -> Faults:
        spec = env.get("BATON_FAULTS", "").strip()
        every = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, n = item.partition(":")
            every[kind.strip()] = int(n or 1)
        timeout = env.get("BATON_FAULTS_TRANSFER_TIMEOUT_S")
        return cls(every, int(env.get("BATON_FAULTS_SEED", "0")), float(timeout) if timeout and every else None)

    def fire(self, kind: str) -> bool:
        if kind not in self.every:
            return False
        with self.lock:
            self.seen[kind] += 1
            hit = self.seen[kind] % self.every[kind] == 0
            if hit:
                self.fired[kind] += 1
        if hit:
            log.warning("fault injected: %s (occurrence %d)", kind, self.seen[kind])
        return hit

    def check_call(self, kind: str) -> None:
        """At the start of a worker call: raise UNAVAILABLE on every Nth."""
        if self.fire(kind):
            raise Unavailable(f"injected fault: {kind}")

    def kv_chunks(self, chunks: Iterable[bytes], deadline_s: float) -> Iterator[bytes]:
        """The K/V data chunks as sent, each broken by at most one fault."""
        for data in chunks:
            kind = next((k for k in KV_KINDS if self.fire(k)), None)
            if kind == "kv_drop":
                continue
            if kind == "kv_truncate":
                with self.lock:
                    cut = self.rng.randrange(len(data)) if len(data) > 1 else 0
                yield data[:cut]
            elif kind == "kv_corrupt":
                with self.lock:
                    at, flip = self.rng.randrange(len(data)), self.rng.randrange(1, 256)
                broken = bytearray(data)
                broken[at] ^= flip
                yield bytes(broken)
            elif kind == "kv_duplicate":
                yield data
                yield data
            else:
                if kind == "kv_stall":
                    time.sleep(deadline_s + 1.0)
                yield data

    def stall_once(self, deadline_s: float) -> Iterator[bytes]:
        """No data chunks, and on every Nth transfer a stall past the deadline (a chunkless transport)."""
        if self.fire("kv_stall"):
            time.sleep(deadline_s + 1.0)
        yield from ()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.fired)


class FaultyTransport:
    """A sending transport (baton/kv_transport/base.py) whose transfers this process's faults break."""

    def __init__(self, inner, faults: Faults, deadline_s: float):
        self.inner, self.faults, self.deadline_s = inner, faults, deadline_s
        self.name = inner.name

    def prepare(self, header, kv):
        from baton.kv_transport.base import Outgoing
        out = self.inner.prepare(header, kv)
        if header.HasField("nixl"):
            return Outgoing(lambda: self.faults.stall_once(self.deadline_s), out.finish)
        return Outgoing(lambda: self.faults.kv_chunks(out.frames(), self.deadline_s), out.finish)

    def held_bytes(self) -> int:
        return self.inner.held_bytes()

    def close(self) -> None:
        self.inner.close()


def wrap_transport(transport, deadline_s: float):
    """`transport` as the worker should use it: itself, or wrapped in this process's faults when configured."""
    faults = injector()
    return FaultyTransport(transport, faults, deadline_s) if faults.every else transport


def transfer_timeout_s(default: float) -> float:
    """The prefill side's K/V transfer deadline: BATON_FAULTS_TRANSFER_TIMEOUT_S with faults on, else `default`."""
    return injector().transfer_timeout_s or default


@functools.cache
def injector() -> Faults:
    """This process's faults, from the environment (read once)."""
    faults = Faults.from_env()
    if faults.every:
        log.warning("fault injection on: %s", faults.every)
    return faults
