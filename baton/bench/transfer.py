"""K/V transfer cost: bytes, transfer time and TTFT, colocated vs over gRPC, per prompt length.

    python -m baton.bench.transfer [--model smollm2] [--lengths 128 512 2048]
"""
from __future__ import annotations

import argparse
import time

from baton.engine import Engine
from baton.model_loader import load_model
from baton.procs import Proc, wait_for
from baton.request import Request
from baton.sampling import SamplingParams


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    from router.client import RouterClient
    model = load_model(a.model, a.dtype, "auto")
    engine = Engine(model)
    prompts = {n: [(i * 7919) % 40000 + 100 for i in range(n)] for n in a.lengths}
    colocated = {}
    for n, ids in prompts.items():  # TTFT in process: the prefill of the prompt alone
        best = float("inf")
        for _ in range(a.repeats):
            t = time.monotonic()
            engine.generate([ids], SamplingParams(max_new_tokens=1))
            best = min(best, time.monotonic() - t)
        colocated[n] = best
    procs = []
    try:
        router = Proc(["router", "--port", "0", "--model", a.model, "--log-level", "WARNING"])
        procs.append(router)
        common = ["--port", "0", "--model", a.model, "--dtype", a.dtype, "--router", router.address, "--log-level", "WARNING"]
        procs += [Proc(["prefill_service", *common]), Proc(["decode_service", *common])]
        with RouterClient(router.address) as c:
            wait_for(lambda: c.stats().decode_workers and c.stats().prefill_workers, 60, what="workers")
            c.complete([1, 2, 3], max_new_tokens=1)
            print("| prompt tokens | K/V bytes | transfer s | TTFT gRPC s | TTFT colocated s | transfer / TTFT |")
            print("|---:|---:|---:|---:|---:|---:|")
            for n, ids in prompts.items():
                runs = [c.complete(ids, max_new_tokens=1, raw=True)[2] for _ in range(a.repeats)]
                last = min(runs, key=lambda r: r.ttft_s)
                print(f"| {n} | {last.kv_bytes / 2**20:.1f} MiB | {last.kv_transfer_s:.3f} | {last.ttft_s:.3f} | "
                      f"{colocated[n]:.3f} | {last.kv_transfer_s / last.ttft_s:.1%} |", flush=True)
    finally:
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    main()
