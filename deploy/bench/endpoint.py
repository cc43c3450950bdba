"""`baton bench endpoint`: what a user gets through the endpoint they call. Starts
`baton up --http-port` in each topology, one after the other on this machine, and drives each
with `baton bench serve` (all requests at once, then Poisson arrivals); servers already running
(vLLM, llama.cpp's llama-server) join the same run with --peer NAME=URL.

    baton bench endpoint [--topologies colocated,disaggregated] [--peer llama.cpp=http://127.0.0.1:8080]
        [--num-prompts 32] [--rate 4 | --rate 2,4,8] [--out docs/bench/endpoint]

Besides the serving metrics it measures torch's matmul rate here, in the dtype served (2048^3 on
all cores, 8192^3 on a GPU), and reports each server's effective GFLOP/s on the workload (model
FLOPs of its prompt and output tokens / duration) as a multiple of it: the one number that
compares across machines.

`--launcher processes` starts the same router, workers and HTTP gateway as plain processes
(deploy/launch.py) instead of `baton up`'s Ray actors: for a machine without Ray, such as a GPU
box that cannot install it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from deploy.launch import local_cluster, pools
from deploy.procs import Proc, free_port
from deploy.bench.serve import ServeConfig, run_serve_bench
from deploy.bench.serve_report import markdown_table

# `baton up` flags per topology: the default (colocated on one device) and a prefill + decode pair.
TOPOLOGIES = {"colocated": [], "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1"]}
# The same topologies as plain processes (--launcher processes).
POOLS = {"colocated": dict(colocated=1), "disaggregated": dict(prefill=1, decode=1)}


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: str = "float32") -> float:
    """torch's matmul rate on this device and dtype with its default threads (best of repeats)."""
    import torch

    from baton.model_loader import DTYPES, resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda":
        n *= 4   # 2048^3 is over in microseconds on a GPU
    a, b = (torch.randn(n, n, device=dev, dtype=DTYPES[dtype]) for _ in range(2))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
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


@contextlib.contextmanager
def serve_up(topology: str, args):
    """The topology serving HTTP, ready; yields its base URL and stops it all on leaving."""
    t = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.launcher == "ray":
            http = free_port()
            argv = ["deploy.cli", "up", "--port", str(free_port()), "--http-port", str(http), "--model", args.model,
                    "--dtype", args.dtype, "--device", args.device, "--max-batch", str(args.max_batch),
                    *TOPOLOGIES[topology], *shlex.split(args.server_args)]
            proc = Proc(argv, ready_timeout=600)
            stack.callback(proc.stop, 30)
            url = f"http://127.0.0.1:{http}"
        else:
            flags = ["--dtype", args.dtype, "--device", args.device, "--max-batch", str(args.max_batch),
                     *shlex.split(args.server_args)]
            cluster = stack.enter_context(local_cluster(args.model, pools(**POOLS[topology], flags=flags),
                                                        ready_timeout=600))
            gateway = Proc(["router.http_gateway", "--router", cluster.router.address, "--port", "0"])
            stack.callback(gateway.stop, 30)
            url = f"http://{gateway.address}"
        print(f"[{topology}] serving in {time.monotonic() - t:.1f} s ({args.launcher})", file=sys.stderr, flush=True)
        yield url


def loads(args) -> list[tuple[str, float]]:
    return [("burst", math.inf)] + [(f"{rate:g} q/s", rate) for rate in args.rate]


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates):
        raise argparse.ArgumentTypeError(f"request rates > 0, comma-separated (e.g. 4 or 2,4,8); got {text!r}")
    return rates


def bench_server(name: str, url: str, args, model_name: str | None) -> dict[str, dict]:
    out = {}
    for k, (load, rate) in enumerate(loads(args)):
        # Each load its own prompts: the second must not find the first's in a server's prefix cache.
        cfg = ServeConfig(base_url=url, model=model_name, num_prompts=args.num_prompts, request_rate=rate,
                          seed=args.seed + k, tokenizer=args.tokenizer, progress=not args.no_progress, goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms})
        r = run_serve_bench(cfg)
        ttft, tpot = _fmt(r["median_ttft_ms"], 1e-3, ".2f"), _fmt(r["median_tpot_ms"], 1, ".0f")
        print(f"[{name} {load}] {r['output_throughput']:.1f} out tok/s, TTFT p50 {ttft} s, TPOT p50 {tpot} ms, "
              f"failed {r['failed']}", file=sys.stderr, flush=True)
        for err in r["errors"]:
            print(f"  error: {err}", file=sys.stderr, flush=True)
        out[load] = r
    return out


def _fmt(x: float | None, scale: float, spec: str) -> str:
    """A median in the report: n/a where no request succeeded."""
    return "n/a" if x is None else format(x * scale, spec)


def effective_gflops(r: dict, per_token: tuple[float, float]) -> float:
    return (r["total_input_tokens"] * per_token[0] + r["total_output_tokens"] * per_token[1]) / r["duration"] / 1e9


def report(results: dict[str, dict[str, dict]], mm: float, per_token, args) -> str:
    lines = []
    for load, _ in loads(args):
        lines += [f"### {load}", "", markdown_table({name: r[load] for name, r in results.items()}), ""]
    lines += ["| server | load | out tok/s | TTFT p50 s | TPOT p50 ms | effective GFLOP/s | × torch matmul |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, per_load in results.items():
        for load, r in per_load.items():
            g = effective_gflops(r, per_token)
            ttft, tpot = _fmt(r["median_ttft_ms"], 1e-3, ".2f"), _fmt(r["median_tpot_ms"], 1, ".0f")
            lines.append(f"| `{name}` | {load} | {r['output_throughput']:.1f} | {ttft} | {tpot} | {g:.1f} | {g / mm:.2f} |")
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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--launcher", default="ray", choices=["ray", "processes"],
                   help="ray: `baton up`; processes: the same router, workers and gateway as plain processes, "
                        "for a machine without Ray (default: ray)")
    p.add_argument("--max-batch", type=int, default=32, help="rows of baton's decode batch (default: 32)")
    p.add_argument("--server-args", default="", metavar="FLAGS",
                   help="more flags for baton's servers, e.g. \"--max-num-batched-tokens 2048\" (the workers' with "
                        "--launcher processes) (default: none)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per load (default: 32)")
    p.add_argument("--rate", type=_rates, default=[4.0], metavar="RATES",
                   help="Poisson rates of the loads after the burst, req/s, comma-separated: a sweep, e.g. 2,4,8 "
                        "(default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="workload seed; the k-th load (0: burst, then each rate) draws its prompts with seed + k "
                        "(default: 0)")
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
    mm = matmul_gflops(device=args.device, dtype=args.dtype)
    per_token = flops_per_token(args.model)
    print(f"torch {args.dtype} matmul here ({args.device}): {mm:.1f} GFLOP/s", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict]] = {}
    for topology in [t for t in args.topologies.split(",") if t]:
        with serve_up(topology, args) as url:
            results[f"baton up ({topology})"] = bench_server(topology, url, args, None)
    for spec in args.peer:
        name, url = spec.split("=", 1)
        results[name] = bench_server(name, url, args, args.peer_model)
    table = report(results, mm, per_token, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}" + _gpu_name(args.device)
    (out / "results.json").write_text(json.dumps({"machine": machine, "torch_matmul_gflops": mm,
                                                  "matmul": {"device": args.device, "dtype": args.dtype},
                                                  "flops_per_token": per_token, "results": results}, indent=1))
    matmul = f"torch {args.dtype} matmul ({args.device}) {mm:.1f} GFLOP/s"
    (out / "results.md").write_text(f"Machine: {machine}; {matmul}.\n\n{table}\n")
    print(table)
    print(f"\nwrote {out}/results.json and results.md", file=sys.stderr)
    return 0


def _gpu_name(device: str) -> str:
    import torch

    from baton.model_loader import resolve_device
    dev = resolve_device(device)
    return f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""


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
