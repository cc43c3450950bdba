"""`python -m prefill_service --port 0 --model DIR [--router 127.0.0.1:50051]`: one prefill
worker as its own process (no Ray needed). Prints `BATON_READY role=prefill address=... pid=...`
once it serves and is registered; stops cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import argparse

from baton.worker_process import Served, parse_args, security, set_up_process


def build(args: argparse.Namespace) -> Served:
    """Load the model on the thread that will run every prefill, then serve Prefill."""
    from baton.device_thread import DeviceThread
    from baton.engine import Prefiller
    from baton.model_loader import load_model
    from baton.model_runner import ModelRunner
    from prefill_service.server import serve
    device = DeviceThread()
    model = device.run(load_model, args.model, args.dtype, args.device)
    # the tokenizer's EOS too; grammars for requests with a json_schema
    prefiller = device.run(lambda: Prefiller(ModelRunner(model.model), model.eos_ids, model.grammars))
    server, port = serve(prefiller, model.max_len, args.host, args.port, device=device, max_queue=args.max_queue,
                         **security(args))
    return Served(args.role, port, lambda grace: server.stop(grace).wait(grace + 1))


def main(argv=None) -> int:
    from router.membership import run_worker
    args = parse_args("prefill", argv, __doc__)
    set_up_process(args)
    return run_worker(args, build(args))
