"""`baton bench`: replay one workload through every system, in one run, and report.

    baton bench [--quick] [--model smollm2] [--dtype float32] [--rate 2] [--burst]
                [--systems static,padded_prefill,orca,baton,baton_grpc,hf_static,hf_continuous]
                [--sweep 1,2,4] [--out docs/bench]
    baton bench serve --base-url URL ...   (load on any OpenAI-compatible server; see its --help)
    baton bench endpoint ...               (baton up in each topology and peers, through HTTP)
    baton bench path-cost ...              (CPU per output token of each server process, from the OS)
    baton bench topologies ...             (colocated vs prefill + decode workers, over gRPC)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

from deploy.bench.metrics import latencies, summarize
from deploy.bench.report import markdown_table, write_report
from deploy.bench.systems import IN_PROCESS
from deploy.bench.workload import WorkloadConfig, make_workload

ALL = ["static", "padded_prefill", "orca", "baton", "baton_grpc", "hf_static", "hf_continuous"]


def progress(name: str, done: int, total: int, _last={}) -> None:
    now = time.monotonic()
    if done == total or now - _last.get(name, 0) > 2:
        _last[name] = now
        print(f"  {name}: {done}/{total} queries", file=sys.stderr, flush=True)


def run_system(name, model, args, queries):
    if name == "baton_grpc":
        from deploy.bench.grpc_system import BatonGrpcSystem
        system = BatonGrpcSystem(args.model, args.dtype, args.max_batch)
    else:
        system = IN_PROCESS[name](model, args.max_batch)
    t = time.monotonic()
    result = system.run(queries, progress)
    summary = summarize(queries, result.token_times, result.start, result.idle_token_fraction, result.extra)
    print(f"[{name}] {summary['output_tokens_per_s']:.1f} tok/s, TTFT p50 {summary['ttft_p50_s']:.2f} s, "
          f"TPOT p50 {summary['tpot_p50_s'] * 1e3:.0f} ms ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)
    return summary, latencies(queries, result.token_times, result.start)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="baton bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 or a local Hugging Face model directory (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="weights and activations (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a small workload: under 5 minutes on 2 CPU cores (default: the full workload)")
    p.add_argument("--queries", type=int, default=None, help="queries in the workload (default: 48, 24 with --quick)")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrival rate, queries/s (default: 4, 8 with --quick)")
    p.add_argument("--burst", action="store_true", help="all queries arrive at once (default: Poisson arrivals)")
    p.add_argument("--max-batch", type=int, default=16, help="rows of each system's decode batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.add_argument("--systems", default=",".join(ALL), help="systems to run, comma-separated (default: %(default)s)")
    p.add_argument("--sweep", default=None,
                   help="comma-separated arrival rates to sweep for baton and orca (default: no sweep)")
    p.add_argument("--out", default="docs/bench", help="folder for the report (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from deploy.bench.serve import main as serve_main
        return serve_main(argv[1:])
    if argv[:1] == ["endpoint"]:
        from deploy.bench.endpoint import main as endpoint_main
        return endpoint_main(argv[1:])
    if argv[:1] == ["path-cost"]:
        from deploy.bench.path_cost import main as path_cost_main
        return path_cost_main(argv[1:])
    if argv[:1] == ["topologies"]:
        from deploy.bench.topologies import main as topologies_main
        return topologies_main(argv[1:])
    args = parse_args(argv)
    from baton.model_loader import load_model
    names = [s for s in args.systems.split(",") if s]
    unknown = set(names) - set(ALL)
    if unknown:
        print(f"baton bench: unknown systems {sorted(unknown)}; choose from {ALL}", file=sys.stderr)
        return 2
    model = load_model(args.model, args.dtype, "auto")
    scale = 0.25 if args.quick else 0.5
    cfg = WorkloadConfig(num_queries=args.queries or (24 if args.quick else 48),
                         rate_qps=None if args.burst else (args.rate or (8.0 if args.quick else 4.0)),
                         seed=args.seed, scale=scale)
    queries = make_workload(cfg, model.tokenizer, model.model.config.vocab_size)
    print(f"workload: {len(queries)} queries, {sum(q.max_new_tokens for q in queries)} output tokens, "
          f"prompts {min(len(q.prompt_ids) for q in queries)}–{max(len(q.prompt_ids) for q in queries)} tokens",
          file=sys.stderr)
    systems, lats = {}, {}
    for name in names:
        systems[name], lats[name] = run_system(name, model, args, queries)
    sweep = {}
    if args.sweep:
        for name in [n for n in ("orca", "baton") if n in names]:
            sweep[name] = []
            for rate in [float(r) for r in args.sweep.split(",")]:
                qs = make_workload(WorkloadConfig(**{**asdict(cfg), "rate_qps": rate}), model.tokenizer,
                                   model.model.config.vocab_size)
                s, _ = run_system(name, model, args, qs)
                sweep[name].append({"rate_qps": rate, **s})
    config = {**asdict(cfg), "model": args.model, "dtype": args.dtype, "max_batch": args.max_batch,
              "device": str(model.model.device), "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs" +
                         (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")}
    out = write_report(args.out, config, systems, sweep, lats)
    print(markdown_table(systems))
    print(f"\nwrote {out}/results.json, results.md and plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
