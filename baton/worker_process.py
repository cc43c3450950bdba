"""What every worker process shares, whatever its role: its flags, its process set-up (CPU pinning,
threads, logging) and the handle its service returns (`Served`). The roles themselves are built in
prefill_service/main.py and decode_service/main.py; router/membership.py registers them."""
from __future__ import annotations

import argparse
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from baton import kv_transport
from baton.config import EngineConfig
from baton.model_loader import DTYPES


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
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and K/V dtype (default: %(default)s)")
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPU ids to pin this worker to (default: any); e.g. to give prefill and "
                        "decode workers their own cores on one machine")
    p.add_argument("--lease-s", type=float, default=30.0, help="how long unclaimed K/V is kept (default: %(default)s)")
    add_prefix_cache_arg(p)
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


def add_prefix_cache_arg(p) -> None:
    """--prefix-cache-mb, of a worker and of `baton up` (which passes it to every worker)."""
    p.add_argument("--prefix-cache-mb", type=int, default=EngineConfig.prefix_cache_mb,
                   help="MiB of prompt-prefix K/V each worker keeps, so that prompts starting alike (a system "
                        "prompt, earlier turns) prefill only the rest; 0 = off (default: %(default)s)")


def set_up_process(args: argparse.Namespace) -> None:
    """Logging, CPU pinning and torch's thread count, before any model is loaded."""
    import torch
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {args.role}[%(process)d] %(name)s: %(message)s")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)


def security(args: argparse.Namespace) -> dict:
    """The service's auth and TLS keywords (see baton.grpc_util.make_server)."""
    return dict(auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                tls_root_cert=args.tls_root_cert, tls_client_ca=args.tls_root_cert if args.tls_mutual else None)
