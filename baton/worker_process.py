"""What every worker process shares, whatever its role: its flags, its process set-up (CPU pinning,
threads, logging) and the handle its service returns (`Served`). The roles themselves are built in
prefill_service/main.py and decode_service/main.py; baton/membership.py registers them."""
from __future__ import annotations

import argparse
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from baton import kv_transport, thread_choice
from baton.engine import step_budget
from baton.engine.config import EngineConfig

# The dtypes a model serves in (baton.kv_codec.DTYPES's names: its K/V travels in them), and `auto`.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
DTYPE_HELP = ("weights, activations and K/V; auto = the model's own (config.json's torch_dtype) on a GPU, float32 "
              "on CPU (the built-in smollm2 is Q4_1 dequantised to float32)")


@dataclass
class Served:
    """A worker's gRPC service, started: its port, and how to stop it and what it runs."""
    role: str
    port: int
    stop: Callable[[float], None]     # grace seconds


def parse_args(role: str, argv=None, doc: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"{role}_service", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="gRPC port, 0 = a free one (default: %(default)s)")
    p.add_argument("--model", default="smollm2", help="smollm2 or a Hugging Face model directory (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help=DTYPE_HELP + " (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="rows in the decode batch (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row; a prefill worker sizes its threads for this many prefills at once "
                        "(default: %(default)s)")
    p.add_argument("--router", default=None, help="router host:port to register with (default: none)")
    p.add_argument("--worker-id", default=None, help="this worker's id (default: ROLE-<random>)")
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="callers must send this token (default: $BATON_AUTH_TOKEN, else none)")
    p.add_argument("--tls-cert", default=None, help="this worker's TLS certificate, PEM (default: none, plain TCP)")
    p.add_argument("--tls-key", default=None, help="its private key, PEM (default: none)")
    p.add_argument("--tls-root-cert", default=None, help="CA to verify peers' TLS certificates (default: none)")
    p.add_argument("--tls-mutual", action="store_true",
                   help="demand a client certificate signed by --tls-root-cert from every caller (mutual TLS)")
    p.add_argument("--threads", type=thread_choice.parse, default=(False, None), metavar="N|auto|auto:N",
                   help="torch CPU threads; auto[:N]: a decode worker times its decode step at start with 1, 2, 4 .. N "
                        "threads (N: its cores) and keeps the fewest that more threads do not beat by 1.25x per doubling, logged "
                        "(baton/thread_choice.py) (default: torch's, all cores)")
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPU ids to pin this worker to (default: any); e.g. to give prefill and "
                        "decode workers their own cores on one machine")
    p.add_argument("--lease-s", type=float, default=30.0, help="how long unclaimed K/V is kept (default: %(default)s)")
    add_engine_args(p)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    kv_transport.add_arg(p)
    if role == "decode":
        p.add_argument("--colocated", action="store_true",
                       help="also serve the Prefill role: prompts sent to this worker are prefilled in its own "
                            "decode steps and their K/V handed to its batch in memory (one device, one process)")
    args = p.parse_args(argv)
    try:   # refused at start, with the reason, where it cannot run: never a silent fallback
        kv_transport.check(args.kv_transport)
    except kv_transport.TransportUnavailable as e:
        p.error(str(e))
    args.role = "colocated" if getattr(args, "colocated", False) else role
    args.worker_id = args.worker_id or f"{args.role}-{uuid.uuid4().hex[:8]}"
    return args


def add_engine_args(p) -> None:
    """The engine's flags, of a worker and of `baton up` / `baton serve` (which pass them to every
    worker, engine_argv()): they become its EngineConfig."""
    d = EngineConfig()
    p.add_argument("--prefix-cache-mb", type=int, default=d.prefix_cache_mb,
                   help="MiB of prompt-prefix K/V each worker keeps, so that prompts starting alike (a system "
                        "prompt, earlier turns) prefill only the rest; 0 = off (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, metavar="N",
                   help="prompt + output tokens a request may hold (vLLM's); longer prompts get INVALID_ARGUMENT "
                        "(HTTP 400); at most the model's max_position_embeddings (default: 0 = that context)")
    p.add_argument("--kv-cache-memory", type=byte_size, default=d.kv_cache_memory, metavar="BYTES",
                   help="bytes of a decode worker's batch K/V cache, allocated once (e.g. 2GiB, 512MB, 1073741824); "
                        "its rows x columns is logged at start-up (default: 0 = on a GPU the --gpu-memory-utilization "
                        "share of its memory less the weights, on CPU 4 GiB; never more than --max-batch rows of the "
                        "whole context)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization, metavar="F",
                   help="on a GPU with no --kv-cache-memory: the share of the device's memory (0-1] a worker may "
                        "fill, weights and K/V cache together (vLLM's) (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.prefill_chunk_tokens, metavar="N",
                   help="the most prompt tokens a colocated worker prefills in a step, in chunks beside the running "
                        "rows (vLLM's name): a step beside running rows takes a quarter of them, more once "
                        "prompts waiting for a first token outnumber the running rows, all of them at 4 to 1 (a "
                        "burst); more gives newcomers their first token sooner, fewer keeps the running rows' "
                        "steps short (default: %(default)s)")
    p.add_argument("--step-time-budget", type=_step_time, default="off", metavar="auto|off|MS",
                   help="how long a colocated step that carries prompt pieces may take beside running rows, from "
                        "what steps are measured to cost here (baton/engine/step_budget.py): 'auto' = twice the "
                        "decode step it joins, more while more prompts wait for a first token than rows run; MS = "
                        "that many milliseconds; 'off' = --max-num-batched-tokens alone sizes the step. A budget "
                        "halves the longest gaps between a stream's tokens but delays first tokens and lowers "
                        "throughput (measured, docs/benchmarks.md) (default: %(default)s)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run the decode step eagerly, without captured CUDA graphs (always eager on CPU)")


def engine_argv(a: argparse.Namespace) -> list[str]:
    """The engine flags of `baton up` / `baton serve`, as a worker's command line."""
    argv = ["--prefix-cache-mb", str(a.prefix_cache_mb), "--max-model-len", str(a.max_model_len),
            "--kv-cache-memory", str(a.kv_cache_memory), "--gpu-memory-utilization", str(a.gpu_memory_utilization),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--step-time-budget", a.step_time_budget]
    return argv + (["--enforce-eager"] if a.enforce_eager else [])


def engine_config(a: argparse.Namespace, **kw) -> EngineConfig:
    """A worker's EngineConfig from its flags (--model, --dtype and --device go to load_model)."""
    return EngineConfig(max_batch=a.max_batch, max_queue=a.max_queue,
                        prefix_cache_mb=a.prefix_cache_mb, max_model_len=a.max_model_len,
                        kv_cache_memory=a.kv_cache_memory, gpu_memory_utilization=a.gpu_memory_utilization,
                        prefill_chunk_tokens=a.max_num_batched_tokens, step_time_ms=step_budget.parse(a.step_time_budget),
                        enforce_eager=a.enforce_eager, **kw)


def _step_time(text: str) -> str:
    try:
        step_budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """'1073741824', '2GiB', '512MB', '1.5G' -> bytes (k, M, G, T are powers of 1000; Ki, Mi, Gi, Ti of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = _UNITS.get(m.group(2).lower().removesuffix("b")) if m else None
    if unit is None:
        raise argparse.ArgumentTypeError(f"a size in bytes, e.g. 2GiB, 512MB or 1073741824; got {text!r}")
    return int(float(m.group(1)) * unit)


def set_up_process(args: argparse.Namespace) -> None:
    """Logging, CPU pinning and torch's thread count, before any model is loaded."""
    import torch
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {args.role}[%(process)d] %(name)s: %(message)s")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    args.auto_threads, count = args.threads
    if args.auto_threads:   # the ceiling until the decode worker has timed its step (decode_service/main.py)
        count = min(count or thread_choice.cores(), thread_choice.cores())
    args.threads = count
    if count:
        torch.set_num_threads(count)
    from baton.model_loader import resolve_dtype
    args.dtype = resolve_dtype(args.model, args.dtype, args.device)


def security(args: argparse.Namespace) -> dict:
    """The service's auth and TLS keywords (see baton.grpc_util.make_server)."""
    return dict(auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                tls_root_cert=args.tls_root_cert, tls_client_ca=args.tls_root_cert if args.tls_mutual else None)
