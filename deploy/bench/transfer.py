"""K/V transfer cost: bytes, transfer time and TTFT, colocated vs over gRPC, per prompt length.

    python -m deploy.bench.transfer [--model smollm2] [--lengths 128 512 2048]
"""
from __future__ import annotations

import argparse
import time

from baton.engine import Engine
from deploy.launch import local_cluster, pools
from baton.model_loader import load_model
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
    flags = ["--dtype", a.dtype, "--log-level", "WARNING"]
    with local_cluster(a.model, pools(1, 1, flags=flags), ["--log-level", "WARNING"]) as cluster, \
            RouterClient(cluster.router.address) as c:
        c.complete([1, 2, 3], max_new_tokens=1)
        print("| prompt tokens | K/V bytes | transfer s | TTFT gRPC s | TTFT colocated s | transfer / TTFT |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n, ids in prompts.items():
            runs = [c.complete(ids, max_new_tokens=1, raw=True)[2] for _ in range(a.repeats)]
            last = min(runs, key=lambda r: r.ttft_s)
            print(f"| {n} | {last.kv_bytes / 2**20:.1f} MiB | {last.kv_transfer_s:.3f} | {last.ttft_s:.3f} | "
                  f"{colocated[n]:.3f} | {last.kv_transfer_s / last.ttft_s:.1%} |", flush=True)

if __name__ == "__main__":
    main()
