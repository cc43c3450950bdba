"""`python -m prefill_service --port 0 --model DIR [--router 127.0.0.1:50051]`: one prefill
worker as its own process (no Ray needed). Prints `BATON_READY role=prefill address=... pid=...`
once it serves and is registered; stops cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import argparse

from baton import faults, grpc_util, kv_transport
from baton.worker_process import Served, parse_args, security, set_up_process

TRANSFER_TIMEOUT_S = 30.0   # a K/V transfer's deadline, from the prefill side


def build(args: argparse.Namespace) -> Served:
    """Load the model on the thread that will run every prefill, then serve Prefill."""
    from baton.device_thread import DeviceThread
    from baton.engine.prefill import Prefiller
    from baton.engine.prefix_cache import PrefixCache
    from baton.engine.runner import ModelRunner
    from baton.model_loader import load_model
    device = DeviceThread()
    model = device.run(load_model, args.model, args.dtype, args.device)
    # the tokenizer's EOS too; grammars for constrained requests
    prefixes = PrefixCache(args.prefix_cache_mb << 20)
    prefiller = device.run(lambda: Prefiller(ModelRunner(model.model, model.gguf), model.eos_ids, model.grammars, prefixes))
    max_len = min(model.max_len, args.max_model_len or model.max_len)   # --max-model-len caps the context
    timeout_s = faults.transfer_timeout_s(TRANSFER_TIMEOUT_S)    # faults: tests only (baton/faults.py)
    transport = faults.wrap_transport(kv_transport.sending(args.kv_transport, kv_transport.agent_name(
        args.worker_id, "send"), args.host), timeout_s)
    server, port = serve(prefiller, max_len, args.host, args.port, device=device, max_queue=args.max_queue,
                         transport=transport, transfer_timeout_s=timeout_s, **security(args))

    def stop(grace: float) -> None:
        server.stop(grace).wait(grace + 1)
        transport.close()    # registered memory goes with the worker
    return Served(args.role, port, stop)


def serve(prefiller, max_len: int, host: str = "127.0.0.1", port: int = 0, *, auth_token=None,
          tls_cert=None, tls_key=None, tls_root_cert=None, tls_client_ca=None,
          transfer_timeout_s: float = TRANSFER_TIMEOUT_S, device=None, max_queue: int = 256, transport=None):
    """Warm up, start the Prefill service; returns (server, port). `device`: the thread that loaded
    the model, which then runs every prefill (baton/device_thread.py). `max_queue`: the Prefill calls
    it expects to hold at once (each keeps a gRPC thread until its K/V is pushed). `transport`: how
    its K/V moves (baton/kv_transport/; default grpc)."""
    from baton.sampling import SamplingParams
    from prefill_service.worker import SERVICE, add_servicer, prefill_worker
    run = device.run if device else (lambda fn, *a: fn(*a))
    run(prefiller.prefill, [1, 2, 3], SamplingParams(max_new_tokens=1))  # warm-up: health means it can compute
    worker = prefill_worker(prefiller, max_len, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                            tls_root_cert=tls_root_cert, transfer_timeout_s=transfer_timeout_s,
                            compute=lambda reqs: run(prefiller.prefill_many, reqs), transport=transport)
    server, bound = grpc_util.make_server(host, port, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                                          tls_client_ca=tls_client_ca,
                                          max_workers=grpc_util.worker_threads(0, max_queue))
    add_servicer(worker, server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE])
    server.start()
    grpc_util.set_health(health, [SERVICE], True)
    return server, bound


def main(argv=None) -> int:
    from baton.membership import run_worker
    args = parse_args("prefill", argv, __doc__)
    set_up_process(args)
    return run_worker(args, build(args))
