"""One thread per process runs the model.

On a CPU, torch's intra-op parallelism is OpenMP (libgomp). Every thread that runs a parallel
op gets an OpenMP thread pool of its own, and once a process holds more OpenMP threads than it
has CPUs, libgomp stops spin-waiting between parallel regions (GOMP_SPINCOUNT's throttled
value): each of a step's ~700 ops then waits for a futex wake-up. Measured on 2 cores (SmolLM2
float32, 32 prompts of 64-192 tokens, 32-96 new tokens each, in process): model loaded on the
main thread and stepped on another, 80-106 tok/s and ~96,000 voluntary context switches; loaded
and stepped on one thread, 143 tok/s and ~650. So a worker loads, warms up and runs its model
on one thread: the decode engine's loop thread (EngineLoop given a factory), or this one.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DeviceThread:
    """A single thread that every model call of the process goes through (blocking callers)."""

    def __init__(self, name: str = "baton-device"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
