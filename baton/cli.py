"""The `baton` command line: up, generate, scale, status, bench."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid

from baton.model_loader import DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (built in) or a local Hugging Face model directory")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion")
    g.add_argument("prompt")
    g.add_argument("--router", default="127.0.0.1:50051")
    g.add_argument("--local", action="store_true", help="run the engine in this process, no servers")
    g.add_argument("--auth-token", default=None)
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("up", help="serve: router + prefill and decode workers on Ray")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=50051)
    _add_model_args(u)
    u.add_argument("--prefill-workers", type=int, default=None,
                   help="dedicated prefill workers (disaggregated pools; default: colocated on one device, "
                        "1 + 1 per pair of GPUs on two or more)")
    u.add_argument("--decode-workers", type=int, default=None, help="dedicated decode workers (disaggregated pools)")
    u.add_argument("--colocated-workers", type=int, default=None,
                   help="workers that each serve prefill and decode in one process, K/V in memory "
                        "(default where prefill and decode would share a device: 1)")
    u.add_argument("--max-batch", type=int, default=32)
    from router import limits as request_limits
    request_limits.add_args(u)  # --max-queue (router and decode workers), --max-new-tokens, ...
    u.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    u.add_argument("--worker-host", default="127.0.0.1", help="address workers bind (their node's IP on a cluster)")
    u.add_argument("--http-port", type=int, default=None, help="also serve an OpenAI-compatible HTTP API")
    from router.http_gateway import config as http_config
    http_config.add_args(u)  # --http-max-body-bytes, --http-keep-alive, --http-max-connections, ...
    u.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"))
    u.add_argument("--tls-cert")
    u.add_argument("--tls-key")
    u.add_argument("--tls-root-cert", help="CA that signed the workers' certificates")
    u.add_argument("--tls-mutual", action="store_true",
                   help="workers demand a client certificate signed by --tls-root-cert (mutual TLS between workers)")
    u.set_defaults(func=cmd_up)

    sub.add_parser("bench", help="the benchmark (see baton bench --help)", add_help=False)

    for name, helptext in (("status", "workers, queue and batch sizes"), ("scale", "resize a worker pool")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--router", default="127.0.0.1:50051")
        c.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"))
        if name == "status":
            c.add_argument("--json", action="store_true")
            c.set_defaults(func=cmd_status)
        else:
            c.add_argument("role", choices=["prefill", "decode", "colocated"])
            c.add_argument("count", type=int)
            c.set_defaults(func=cmd_scale)
    return parser


def cmd_up(args) -> int:
    from deploy.up import up
    return up(args)


def cmd_status(args) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    from router.client import RouterClient
    with RouterClient(args.router, auth_token=args.auth_token) as c:
        st = c.status()
    if args.json:
        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)))
        return 0
    s = st.stats
    print(f"model {st.model} ({st.topology}): {s.running} running, {s.waiting} waiting (queue limit {st.max_queue}); "
          f"completed {s.completed}, failed {s.failed}, cancelled {s.cancelled}")
    print(f"{'role':8} {'id':18} {'pid':>7} {'address':22} {'alive':5} {'load':>4} {'batch':>5} {'width':>5}")
    for w in st.workers:
        print(f"{w.role:8} {w.worker_id:18} {w.pid:>7} {w.address:22} {str(w.alive):5} {w.load:>4} "
              f"{w.running:>5} {w.batch_width:>5}")
    return 0


def cmd_scale(args) -> int:
    import grpc

    from router.client import RouterClient
    try:
        with RouterClient(args.router, auth_token=args.auth_token) as c:
            print(f"{args.role} workers: {c.scale(args.role, args.count)}")
        return 0
    except grpc.RpcError as e:
        print(f"baton: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def _sampling(args):
    from baton.sampling import SamplingParams
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.seed is not None:
        kw["seed"] = args.seed
    params = SamplingParams(**kw)
    params.validate()
    return params


def cmd_generate(args) -> int:
    if not args.local:
        from router.client import generate_cli  # the gRPC client
        return generate_cli(args)
    from baton.config import EngineConfig
    from baton.engine import Engine
    from baton.engine_loop import EngineLoop
    from baton.model_loader import encode_prompt, load_model
    from baton.request import Request
    try:
        params = _sampling(args)
    except ValueError as e:
        print(f"baton: {e}", file=sys.stderr)
        return 2
    model = load_model(args.model, args.dtype, args.device)
    loop = EngineLoop(Engine(model, EngineConfig(model=args.model, dtype=args.dtype))).start()
    try:
        req = Request(uuid.uuid4().hex, encode_prompt(model.tokenizer, args.prompt, args.raw), params)
        for ev in loop.submit(req):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        loop.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: many options
        from baton.bench.run import main as bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
