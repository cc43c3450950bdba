"""Where a step's time goes: torch.profiler over decode steps and a prefill of the engine.

    python -m deploy.bench.profile [--model smollm2] [--rows 32] [--context 512] [--prompt 512] [--top 12]

Prints, per phase, the wall time of one step and the operators that take most of it (self CPU
time, summed over the step), plus the share spent outside operators (Python, dispatch).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.runner import PromptChunk
from baton.model_loader import load_model
from deploy.bench.step import filled_batch


def _profiled(fn, iters: int, top: int) -> str:
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    wall = (time.perf_counter() - t) / iters
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_ops = sum(e.self_cpu_time_total for e in events) / iters / 1e6
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"step {wall * 1e3:.1f} ms (unprofiled); operators {total_ops * 1e3:.1f} ms of the profiled step",
             "| operator | calls/step | ms/step | share of ops |", "|---|---:|---:|---:|"]
    for e in events[:top]:
        ms = e.self_cpu_time_total / iters / 1e3
        lines.append(f"| `{e.key}` | {e.count // iters} | {ms:.2f} | {ms / (total_ops * 1e3):.0%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="decode batch sizes to profile")
    p.add_argument("--context", type=int, default=512, help="tokens in each decode row's cache")
    p.add_argument("--prompt", type=int, default=512, help="tokens of the prefill profiled")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    model = load_model(a.model, a.dtype, "auto")
    engine = Engine(model, EngineConfig(max_batch=1))   # its batch is unused: filled_batch builds one per size
    print(f"{model.model.config.model_type} {a.dtype}, {torch.get_num_threads()} threads\n")
    for rows in a.rows:
        batch = filled_batch(engine, rows, a.context)
        print(f"## decode step, batch {rows}, context {a.context}\n\n{_profiled(batch.step, a.iters, a.top)}\n")
    runner = engine.runner
    ids = torch.randint(100, runner.vocab_size - 100, (a.prompt,)).tolist()
    prefill = lambda: runner.forward([], None, [PromptChunk(ids, 0, runner.new_kv(len(ids)))])  # noqa: E731
    print(f"## prefill, one prompt of {a.prompt} tokens\n\n{_profiled(prefill, a.iters, a.top)}\n")


if __name__ == "__main__":
    main()
