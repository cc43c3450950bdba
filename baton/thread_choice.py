"""How many torch threads a CPU worker's engine runs with, chosen by timing its own decode step.

A fixed count is wrong one way or the other. For a tiny model every step is ~100 small ops, and a
second OpenMP thread only adds its hand-offs and its spinning between ops: measured on 2 cores
(2 layers, hidden 64, 256 rows), 210-306 µs of CPU per token with 2 threads against 23 with 1. For
SmolLM2 the same step's matmuls do gain from the second core. So a worker started with
`--threads auto[:N]` times a few decode steps of a full-ish batch with 1, 2, 4 ... N threads
(alternating, best of a few rounds, since other work on the machine only ever adds) and keeps the
fewest that no larger count beats by MIN_GAIN per doubling: an OpenMP thread spins between ops, so
a thread that buys less than that costs a core's worth of CPU for little. Measured on 2 cores: the
tiny model's step 1.07-1.10x faster with 2 threads (a 10 % bar flipped between 1 and 2 from one
start to the next, and with 2 the path cost 56 µs of CPU a token against 34), SmolLM2's 1.42-1.49x.
It logs what it timed and what it kept.

Runs on the engine's own thread (torch's OpenMP thread count is per calling thread), before the
worker serves anything.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch and the engine load only where the choice is made, not where flags are parsed
    from baton.engine.engine import Engine

log = logging.getLogger(__name__)

MIN_GAIN = 1.25      # the speed-up a doubling of threads must buy to be worth its cores
ROWS = 16            # rows of the timed batch (at most the worker's --max-batch)
PROMPT = 4           # prompt tokens of each row
STEPS = 4            # decode steps timed per trial
ROUNDS = 2           # trials per thread count, the best kept


def parse(value: str) -> tuple[bool, int | None]:
    """--threads (an argparse type): 'N', 'auto' (up to this process's cores) or 'auto:N'
    -> (choose by timing, the count or the ceiling)."""
    auto, _, n = value.partition(":") if value.startswith("auto") else ("", "", value)
    try:
        count = int(n) if n else None
    except ValueError:
        count = 0
    if not value or (auto and auto != "auto") or (count is not None and count < 1):
        raise argparse.ArgumentTypeError(f"a number of threads (at least 1), auto or auto:N; got {value!r}")
    return bool(auto), count


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def candidates(ceiling: int) -> list[int]:
    """1, 2, 4 ... and the ceiling itself: a handful of trials however many cores there are."""
    out, k = [], 1
    while k < ceiling:
        out.append(k)
        k *= 2
    return out + [ceiling]


def step_seconds(engine: "Engine", rows: int, steps: int, trial: int) -> float:
    """Seconds of one decode step of `rows` rows, timed over `steps` steps once the rows are in the
    batch. Prompts differ per trial (no prefix-cache hits); the requests run to their end after."""
    from baton.request import Request
    from baton.sampling import SamplingParams
    vocab = engine.runner.vocab_size
    params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
    reqs = [Request(f"thread-choice-{trial}-{i}",
                    [3 + (trial * 7919 + i * 131 + k * 17) % max(1, vocab - 3) for k in range(PROMPT)], params)
            for i in range(rows)]
    for r in reqs:
        engine.add_request(r)
    while any(not r.output_ids for r in reqs) and engine.has_work():   # prefill: every row has its first token
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = time.perf_counter() - t
    while engine.has_work():
        engine.step()
    return dt / steps


def fewest_paying(seconds: dict[int, float], gain: float = MIN_GAIN) -> int:
    """The fewest threads that no larger count beats by `gain` per doubling (j threads against k
    must be (j / k) ** log2(gain) times faster)."""
    def beats(j: int, k: int) -> bool:
        return seconds[k] / seconds[j] >= (j / k) ** math.log2(gain)
    return min(k for k in seconds if not any(beats(j, k) for j in seconds if j > k))


def choose(engine: "Engine", ceiling: int, gain: float = MIN_GAIN, rounds: int = ROUNDS) -> tuple[int, str]:
    """Time the decode step at each candidate count on this thread, set the fewest threads that
    more do not beat by `gain` per doubling; returns them and a line saying what was timed. The engine must be
    idle (start-up)."""
    import torch
    counts = candidates(max(1, ceiling))
    if len(counts) == 1:
        torch.set_num_threads(counts[0])
        return counts[0], f"torch threads: {counts[0]}"
    rows = max(1, min(ROWS, engine.config.max_batch))
    before = dict(engine.counts)     # its completed count is the served requests', not these
    best: dict[int, float] = {}
    for rnd in range(rounds):
        for i, k in enumerate(counts):
            torch.set_num_threads(k)
            s = step_seconds(engine, rows, STEPS, rnd * len(counts) + i)
            best[k] = min(best.get(k, s), s)
    engine.counts.clear()
    engine.counts.update(before)
    chosen = fewest_paying(best, gain)
    torch.set_num_threads(chosen)
    note = (f"torch threads: {chosen} (decode step of {rows} rows timed with "
            + ", ".join(f"{k}: {1e3 * s:.2f} ms" for k, s in sorted(best.items()))
            + f"; the fewest that more do not beat by {gain:g}x per doubling)")
    log.info("%s", note)
    return chosen, note
