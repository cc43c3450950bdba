"""K/V transfer cost per transport, in one run: the K/V of one prompt from a prefill worker process
into a decode worker process's batch, over grpc and over nixl, on the same model and dtype.

    python -m deploy.bench.transfer [--model smollm2] [--lengths 512 2048] [--repeats 5]

For each transport a router, one prefill and one decode worker (separate processes on this
machine) serve greedy 1-token requests of each prompt length, the transports' requests in turn.
Reported per length: the K/V bytes, the transfer time (the prefill worker's TransferKV call: header,
bytes, the decode worker's checks and its admission to the batch's queue; best and median of the
repeats), the TTFT of a request that prefills the whole prompt, the transfer's share of it, and
NIXL's speed-up over grpc (medians). The insert into the batch (one copy, the same for both) is in
TTFT. Prints a markdown table; `--json FILE` also writes the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics

from deploy.launch import local_cluster, pools

TRANSPORTS = ("grpc", "nixl")


def measure(model: str, dtype: str, transports: list[str], prompts: dict[int, list[int]], repeats: int) -> dict:
    """{transport: {length: {"kv_bytes", "cold_ttft_s", "transfer_s": [...]}}}. One cluster per transport,
    all up at once, their requests taken in turn, so that every transport sees the same load on the
    machine. The first request of each length prefills the whole prompt (its TTFT is reported); the
    repeats hit the prefill worker's prefix cache, so they cost little compute, yet carry the whole
    prompt's K/V."""
    from router.client import RouterClient
    with contextlib.ExitStack() as stack:
        clients = {}
        for t in transports:
            flags = ["--dtype", dtype, "--log-level", "WARNING", "--kv-transport", t]
            cluster = stack.enter_context(local_cluster(model, pools(1, 1, flags=flags), ["--log-level", "WARNING"]))
            clients[t] = stack.enter_context(RouterClient(cluster.router.address))
        out: dict = {t: {} for t in transports}
        for n, ids in prompts.items():
            for t, c in clients.items():
                last = c.complete(ids, max_new_tokens=1, raw=True)[2]
                out[t][n] = {"kv_bytes": last.kv_bytes, "cold_ttft_s": last.ttft_s, "cold_transfer_s": last.kv_transfer_s,
                             "transfer_s": [], "ttft_s": []}
            for _ in range(repeats):
                for t, c in clients.items():
                    last = c.complete(ids, max_new_tokens=1, raw=True)[2]
                    out[t][n]["transfer_s"].append(last.kv_transfer_s)
                    out[t][n]["ttft_s"].append(last.ttft_s)
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| prompt tokens | K/V MiB | transport | transfer best s | transfer median s | TTFT s (full prefill) "
             "| transfer / TTFT | speed-up (median) |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    lengths = next(iter(results.values())).keys()
    for n in lengths:
        base = statistics.median(results["grpc"][n]["transfer_s"]) if "grpc" in results else None
        for t, res in results.items():
            r = res[n]
            med, ttft = statistics.median(r["transfer_s"]), r["cold_ttft_s"]
            speed = f"{base / med:.1f}x" if base and t != "grpc" else "1.0x" if t == "grpc" else "-"
            lines.append(f"| {n} | {r['kv_bytes'] / 2**20:.1f} | {t} | {min(r['transfer_s']):.4f} | {med:.4f} | "
                         f"{ttft:.3f} | {med / ttft:.1%} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    prompts = {n: [(i * 7919) % 40000 + 100 for i in range(n)] for n in a.lengths}
    print(f"{', '.join(a.transports)}: {a.lengths} tokens x {a.repeats}...", flush=True)
    results = measure(a.model, a.dtype, a.transports, prompts, a.repeats)
    print(table(results), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
