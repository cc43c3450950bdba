"""`baton bench topologies`: where disaggregation pays. One workload through the colocated
worker and through a prefill + a decode worker, over gRPC, one after the other on one machine.

    baton bench topologies [--model smollm2] [--device auto] [--pin] [--rate 4] [--queries 32]

`--pin` emulates two devices on one CPU: the prefill worker gets the first half of the cores
and the decode worker the other half (CPU affinity), against the colocated worker on all of
them. The workload is the one of issue 11: seeded random prompts of 64-192 tokens, outputs of
32-96, greedy, at once (burst) and at a Poisson rate. Reports output tok/s, TTFT and TPOT.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from deploy.bench.grpc_system import BatonGrpcSystem
from deploy.bench.metrics import summarize
from deploy.bench.workload import Query


def _vocab_size(model: str) -> int:
    from baton.model_files import model_config
    return int(model_config(model)["vocab_size"])


def random_queries(n: int, rate: float | None, seed: int, vocab: int) -> list[Query]:
    """Token ids drawn away from the ends of the vocabulary (special tokens live there)."""
    rng = np.random.default_rng(seed)
    edge = min(100, vocab // 8)
    arrivals = np.zeros(n) if rate is None else np.cumsum(rng.exponential(1.0 / rate, n))
    return [Query(i, float(arrivals[i]), rng.integers(edge, vocab - edge, int(rng.integers(64, 193))).tolist(),
                  int(rng.integers(32, 97))) for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="baton bench topologies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 or a local Hugging Face model directory (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="weights and activations (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="rows of the decode batch (default: %(default)s)")
    p.add_argument("--queries", type=int, default=32, help="queries per run (default: %(default)s)")
    p.add_argument("--rate", type=float, default=4.0,
                   help="Poisson arrival rate of the second run, queries/s (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.add_argument("--pin", action="store_true",
                   help="pin the disaggregated workers each to half of the cores (default: not pinned)")
    a = p.parse_args(argv)
    rows = []
    for load, rate in (("burst", None), (f"{a.rate:g} q/s", a.rate)):
        queries = random_queries(a.queries, rate, a.seed, _vocab_size(a.model))
        for topology in ("colocated", "disaggregated"):
            system = BatonGrpcSystem(a.model, a.dtype, a.max_batch, topology=topology, device=a.device, pin=a.pin)
            result = system.run(queries)
            s = summarize(queries, result.token_times, result.start)
            rows.append((topology + (" (pinned)" if a.pin and topology == "disaggregated" else ""), load, s))
            print(f"[{topology} {load}] {s['output_tokens_per_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_s']:.2f} s",
                  file=sys.stderr, flush=True)
    print("| topology | load | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, load, s in rows:
        print(f"| {name} | {load} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | "
              f"{s['tpot_p50_s'] * 1e3:.0f} | {s['tpot_p99_s'] * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
