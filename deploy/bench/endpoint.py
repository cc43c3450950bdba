"""`baton bench endpoint`: what a user gets through the endpoint they call. Starts
`baton up --http-port` in each topology, one after the other on this machine, and drives each
with `baton bench serve` (all requests at once, then Poisson arrivals); servers already running
(vLLM, llama.cpp's llama-server) join the same run with --peer NAME=URL.

    baton bench endpoint [--topologies colocated,disaggregated] [--peer llama.cpp=http://127.0.0.1:8080]
        [--num-prompts 32] [--rate 4] [--out docs/bench/endpoint]

Besides the serving metrics it measures torch's fp32 matmul rate here (2048^3, all cores) and
reports each server's effective GFLOP/s on the workload (model FLOPs of its prompt and output
tokens / duration) as a multiple of it: the one number that compares across machines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

from baton.procs import Proc
from deploy.bench.serve import ServeConfig, run_serve_bench
from deploy.bench.serve_report import markdown_table

# `baton up` flags per topology: the default (colocated on one device) and a prefill + decode pair.
TOPOLOGIES = {"colocated": [], "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """torch's fp32 matmul rate on this machine with its default threads (best of repeats)."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops_per_token(model: str) -> tuple[float, float]:
    """(prefill, decode) FLOPs per token of a Llama-family model: 2 x the parameters each token
    goes through (layers; decode adds the LM head, which a prompt runs for its last token only)."""
    from baton.model_files import model_config
    cfg = model_config(model)
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads", heads)
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * i
    body = 2 * layers * per_layer
    return body, body + 2 * h * cfg["vocab_size"]


def serve_up(topology: str, args) -> tuple[Proc, str]:
    """`baton up` with an HTTP port, ready to serve; returns the process and its base URL."""
    http = _free_port()
    argv = ["deploy.cli", "up", "--port", str(_free_port()), "--http-port", str(http), "--model", args.model,
            "--dtype", args.dtype, "--max-batch", str(args.max_batch), *TOPOLOGIES[topology]]
    t = time.monotonic()
    proc = Proc(argv, ready_timeout=600)
    print(f"[{topology}] baton up ready in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    return proc, f"http://127.0.0.1:{http}"


def loads(args) -> list[tuple[str, float]]:
    return [("burst", math.inf), (f"{args.rate:g} q/s", args.rate)]


def bench_server(name: str, url: str, args, model_name: str | None) -> dict[str, dict]:
    out = {}
    for load, rate in loads(args):
        cfg = ServeConfig(base_url=url, model=model_name, num_prompts=args.num_prompts, request_rate=rate,
                          seed=args.seed, tokenizer=args.tokenizer, progress=not args.no_progress, goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms})
        r = run_serve_bench(cfg)
        print(f"[{name} {load}] {r['output_throughput']:.1f} out tok/s, TTFT p50 {r['median_ttft_ms'] / 1e3:.2f} s, "
              f"TPOT p50 {r['median_tpot_ms']:.0f} ms, failed {r['failed']}", file=sys.stderr, flush=True)
        out[load] = r
    return out


def effective_gflops(r: dict, per_token: tuple[float, float]) -> float:
    return (r["total_input_tokens"] * per_token[0] + r["total_output_tokens"] * per_token[1]) / r["duration"] / 1e9


def report(results: dict[str, dict[str, dict]], mm: float, per_token, args) -> str:
    lines = []
    for load, _ in loads(args):
        lines += [f"### {load}", "", markdown_table({name: r[load] for name, r in results.items()}), ""]
    lines += ["| server | load | out tok/s | TTFT p50 s | TPOT p50 ms | effective GFLOP/s | × torch fp32 matmul |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, per_load in results.items():
        for load, r in per_load.items():
            g = effective_gflops(r, per_token)
            lines.append(f"| `{name}` | {load} | {r['output_throughput']:.1f} | {r['median_ttft_ms'] / 1e3:.2f} | "
                         f"{r['median_tpot_ms']:.0f} | {g:.1f} | {g / mm:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="baton bench endpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help=f"baton up topologies to start, comma-separated, from {list(TOPOLOGIES)} (default: all)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=URL",
                   help="a running OpenAI-compatible server to drive with the same load (repeatable; default: none)")
    p.add_argument("--peer-model", default=None, help="model name to send to peers (default: their first)")
    p.add_argument("--model", default="smollm2", help="model baton serves (default: smollm2)")
    p.add_argument("--dtype", default="float32", help="dtype baton serves (default: float32)")
    p.add_argument("--max-batch", type=int, default=32, help="rows of baton's decode batch (default: 32)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per load (default: 32)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson rate of the second load, req/s (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--slo-ttft-ms", type=float, default=10000, help="goodput SLO on TTFT (default: 10000)")
    p.add_argument("--slo-tpot-ms", type=float, default=250, help="goodput SLO on TPOT (default: 250)")
    p.add_argument("--tokenizer", default="smollm2",
                   help="tokenizer that sizes the prompts: smollm2, a directory, or none (default: smollm2)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines while a load runs (default: progress)")
    p.add_argument("--out", default="docs/bench/endpoint", help="folder for results.json and results.md (default: %(default)s)")
    a = p.parse_args(argv)
    unknown = set(a.topologies.split(",")) - set(TOPOLOGIES) - {""}
    if unknown:
        p.error(f"unknown topologies {sorted(unknown)}; choose from {list(TOPOLOGIES)}")
    if any("=" not in s for s in a.peer):
        p.error("--peer takes NAME=URL, e.g. llama.cpp=http://127.0.0.1:8080")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    mm = matmul_gflops()
    per_token = flops_per_token(args.model)
    print(f"torch fp32 matmul here: {mm:.1f} GFLOP/s", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict]] = {}
    for topology in [t for t in args.topologies.split(",") if t]:
        proc, url = serve_up(topology, args)
        try:
            results[f"baton up ({topology})"] = bench_server(topology, url, args, None)
        finally:
            proc.stop(timeout=30)
    for spec in args.peer:
        name, url = spec.split("=", 1)
        results[name] = bench_server(name, url, args, args.peer_model)
    table = report(results, mm, per_token, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}"
    (out / "results.json").write_text(json.dumps({"machine": machine, "torch_fp32_matmul_gflops": mm,
                                                  "flops_per_token": per_token, "results": results}, indent=1))
    (out / "results.md").write_text(f"Machine: {machine}; torch fp32 matmul {mm:.1f} GFLOP/s.\n\n{table}\n")
    print(table)
    print(f"\nwrote {out}/results.json and results.md", file=sys.stderr)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
