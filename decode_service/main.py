"""`python -m decode_service --port 0 --model DIR [--router 127.0.0.1:50051] [--colocated]`: one
decode (or colocated) worker as its own process (no Ray needed). Prints `BATON_READY role=decode
address=... pid=...` once it serves and is registered; stops cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import argparse

from baton.worker_process import Served, parse_args, security, set_up_process


def build(args: argparse.Namespace) -> Served:
    """The engine loop's thread loads the model and runs it (one thread for all model work);
    a warm-up request, then the Decode service (and Prefill too when colocated)."""
    from baton.config import EngineConfig
    from baton.engine import Engine
    from baton.engine_loop import EngineLoop
    from baton.model_loader import load_model
    from baton.request import Request
    from baton.sampling import SamplingParams
    from decode_service.server import serve
    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       max_batch=args.max_batch, max_queue=args.max_queue)
    loop = EngineLoop(lambda: Engine(load_model(args.model, args.dtype, args.device), cfg)).start()
    list(loop.submit(Request("warmup", [1, 2, 3], SamplingParams(max_new_tokens=2))))
    server, port, _watchdog = serve(loop, args.host, args.port, lease_s=args.lease_s,
                                    colocated=args.role == "colocated", **security(args))

    def stop(grace: float) -> None:
        server.stop(grace).wait(grace + 1)
        loop.stop()
    return Served(args.role, port, stop)


def main(argv=None) -> int:
    from router.membership import run_worker
    args = parse_args("decode", argv, __doc__)
    set_up_process(args)
    return run_worker(args, build(args))
