"""The `baton` command line: up, generate, scale, status, bench."""
from __future__ import annotations

import argparse
import logging
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
    return parser


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
