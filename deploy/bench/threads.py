"""The decode step's wall and CPU time at each torch thread count, in process: the measurement behind
`--threads auto` (baton/thread_choice.py), with the rows and rounds given here.

    python -m deploy.bench.threads [--model smollm2|DIR] [--rows 32] [--threads 1 2] [--rounds 4]
    OMP_WAIT_POLICY=PASSIVE python -m deploy.bench.threads ...   # libgomp reads it at start only
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from baton import thread_choice
from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.model_loader import load_model

STEPS = 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.bench.threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=4, help="trials per count, the best kept (default: %(default)s)")
    a = p.parse_args(argv)
    engine = Engine(load_model(a.model, "float32", "cpu"), EngineConfig(max_batch=a.rows))
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for rnd in range(a.rounds):
        for i, k in enumerate(a.threads):
            torch.set_num_threads(k)
            c = time.process_time()
            s = thread_choice.step_seconds(engine, a.rows, STEPS, rnd * len(a.threads) + i)
            c = (time.process_time() - c) / (STEPS + 3)   # CPU of the whole trial, per step (prefill included)
            wall[k], cpu[k] = min(wall.get(k, s), s), min(cpu.get(k, c), c)
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    for k in a.threads:
        print(f"{a.model}: {a.rows} rows, {k} thread(s), OMP_WAIT_POLICY={policy}: decode step {1e3 * wall[k]:.2f} ms "
              f"({a.rows / wall[k]:.0f} tok/s), ~{1e3 * cpu[k]:.2f} ms CPU a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
