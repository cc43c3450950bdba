"""The `baton` command line: up, serve, generate, scale, status, bench.

Importing this module imports neither torch, Ray nor gRPC, and main() builds the parser of the
one command it runs: `baton --help`, `--version` and `status` answer in a fraction of a second
(docs/benchmarks.md). Each command imports what it needs when it runs."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from deploy import up_flags


ROUTER = "127.0.0.1:50051"
# Failures of the channel itself (as opposed to an answer of the router): the address is wrong.
_CANNOT_CONNECT = ("failed to connect", "connection refused", "dns resolution failed", "name resolution",
                   "connect failed", "no route to host")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag shows its default: argparse's "(default: X)" unless the help says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = all")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under this share of the top one's (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable) (default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already in the output (OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted once per time a token is already in the output (OpenAI's)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="logits of tokens in the prompt or the output divided by it (vLLM's; 1 = off)")
    p.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence token before this many tokens")
    p.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100 to 100) to a token's logit (repeatable) (default: none)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--json-schema", default="",
                      help="a JSON schema (text, or @FILE) the output must follow: constrained decoding "
                           "(default: free text)")
    held.add_argument("--regex", default="", help="a regular expression the whole output must match")
    held.add_argument("--grammar", default="",
                      help="an EBNF grammar (text, or @FILE; xgrammar's syntax, rule `root`) the output must follow")
    held.add_argument("--choice", action="append", default=[],
                      help="the output is exactly one of these strings (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def _add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("BATON_ROUTER", ROUTER),
                   help=f"the router's gRPC address host:port (default: $BATON_ROUTER, else {ROUTER})")
    p.add_argument("--auth-token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="the router's token (default: $BATON_AUTH_TOKEN, else none)")


class _Version(argparse.Action):
    """--version: the installed package's version, read only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"baton {version()}")
        parser.exit()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as package_version
    try:
        return package_version("baton")
    except PackageNotFoundError:   # run from a checkout that is not installed
        return "unknown (not installed)"


def _fill_generate(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompt", help="the prompt (a user message: the chat template applies unless --raw)")
    _add_router_args(g)
    g.add_argument("--local", action="store_true", help="run the engine in this process, no servers")
    up_flags.add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)


def _fill_up(u: argparse.ArgumentParser) -> None:
    up_flags.add_args(u)
    u.set_defaults(func=cmd_up)


def _fill_serve(v: argparse.ArgumentParser) -> None:
    up_flags.add_args(v, serve=True)
    v.set_defaults(func=cmd_serve)


def _fill_status(s: argparse.ArgumentParser) -> None:
    _add_router_args(s)
    s.add_argument("--json", action="store_true", help="print the router's StatusResponse as JSON")
    s.set_defaults(func=cmd_status)


def _fill_scale(c: argparse.ArgumentParser) -> None:
    _add_router_args(c)
    c.add_argument("role", choices=["prefill", "decode", "colocated"],
                   help="the pool: colocated in the default deployment on one device, prefill or decode where "
                        "the pools are apart (baton status shows which)")
    c.add_argument("count", type=int, help="its size wanted, >= 1")
    c.set_defaults(func=cmd_scale)


DESCRIPTION = ("baton: an LLM server that batches like BATON (prefill and decode workers placed by Ray, a gRPC "
               "router, an OpenAI-compatible HTTP API). `baton COMMAND --help` explains each command's flags.")

# command: (its one-line help, what fills its parser)
COMMANDS = {
    "up": ("serve: router + prefill and decode workers on Ray (gRPC; --http-port adds the OpenAI API)", _fill_up),
    "serve": ("vLLM's serve line: `baton serve MODEL --port 8000`, the same deployment as up with the OpenAI "
              "API on --port and the gRPC router on --grpc-port", _fill_serve),
    "generate": ("stream a completion", _fill_generate),
    "status": ("workers, queue and batch sizes", _fill_status),
    "scale": ("resize a worker pool", _fill_scale),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; `only`: fill just that command's flags (the others keep their one-line help),
    so that a command imports no module another one's flags come from."""
    parser = argparse.ArgumentParser(prog="baton", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action=_Version, help="print baton's version and exit")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (what, fill) in COMMANDS.items():
        p = sub.add_parser(name, help=what, description=what, formatter_class=HelpFormatter)
        if only is None or only == name:
            fill(p)
    sub.add_parser("bench", help="the benchmark (see baton bench --help)", add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command argv names (its first word that is no top-level option)."""
    words = iter(argv)
    for w in words:
        if w == "--log-level":
            next(words, None)
        elif not w.startswith("-"):
            return w
    return None


def _with_router(args, call) -> int:
    """`call(client)` against --router; a gRPC failure is one line on stderr, with a hint when the
    router cannot be reached at all."""
    import grpc

    from router.client import RouterClient
    try:
        with RouterClient(args.router, auth_token=args.auth_token) as client:
            return call(client) or 0
    except grpc.RpcError as e:
        details = (e.details() or "").replace("\n", " ")
        if e.code() == grpc.StatusCode.UNAVAILABLE and any(n in details.lower() for n in _CANNOT_CONNECT):
            print(f"baton: cannot reach the router at {args.router} ({details}); start one with `baton up`, "
                  "or pass --router HOST:PORT or set BATON_ROUTER", file=sys.stderr)
        else:
            print(f"baton: {e.code().name}: {details}", file=sys.stderr)
        return 1


def cmd_up(args) -> int:
    why = up_flags.refusal(args) or up_flags.bad_value(args)
    if why:
        print(f"baton: {why}", file=sys.stderr)
        return 2
    from deploy.up import up
    rc = up(args)
    # Everything this process started has stopped (up() waited for it): leave now. The interpreter's
    # own teardown (gRPC's and torch's finalisers, Ray's atexit hook) took another 0.5-1.2 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def cmd_serve(args) -> int:
    """`baton serve`: `baton up` with the HTTP API on --host:--port and the router on --grpc-host:--grpc-port."""
    args.http_host, args.http_port = args.host, args.port
    args.host, args.port = args.grpc_host, args.grpc_port
    return cmd_up(args)


def cmd_status(args) -> int:
    from deploy.status_view import print_status
    return _with_router(args, lambda client: print_status(client.status(), args.json))


def cmd_scale(args) -> int:
    return _with_router(args, lambda client: print(f"{args.role} workers: {client.scale(args.role, args.count)}"))


def _sampling_fields(args) -> dict:
    """The sampling flags as GenerateRequest fields (logit_bias a {token_id: bias} map)."""
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, min_p=args.min_p, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
              repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
              logit_bias=_logit_bias(args.logit_bias), json_schema=_text_or_file("--json-schema", args.json_schema),
              regex=args.regex, grammar=_text_or_file("--grammar", args.grammar))
    if args.choice:
        from baton.sampling import choice_grammar
        kw["grammar"] = choice_grammar(args.choice)
    if args.seed is not None:
        kw["seed"] = args.seed
    return kw


def _text_or_file(flag: str, value: str) -> str:
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as e:
        raise ValueError(f"{flag} {value}: {e.strerror}") from None


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. 42=-100; got {item!r}") from None
    return bias


def _stream(client, prompt: str, raw: bool, fields: dict) -> None:
    wrote = False
    try:
        for r in client.generate(prompt, raw=raw, **fields):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            wrote = True
    finally:
        if wrote:   # the error, if any, starts on a line of its own
            sys.stdout.write("\n")


def cmd_generate(args) -> int:
    try:
        fields = _sampling_fields(args)
    except ValueError as e:
        print(f"baton: {e}", file=sys.stderr)
        return 2
    if not args.local:
        return _with_router(args, lambda client: _stream(client, args.prompt, args.raw, fields))
    import uuid

    from baton import grammar
    from baton.engine.config import EngineConfig
    from baton.engine.engine import Engine
    from baton.engine.loop import EngineLoop
    from baton.model_files import encode_prompt
    from baton.model_loader import load_model, resolve_dtype
    from baton.request import Request
    from baton.sampling import SamplingParams, bias_pairs
    try:
        params = SamplingParams(**{**fields, "logit_bias": bias_pairs(fields["logit_bias"])})
        params.validate()
    except ValueError as e:
        print(f"baton: {e}", file=sys.stderr)
        return 2
    # The loop thread loads the model and runs it (baton/device_thread.py).
    dtype = resolve_dtype(args.model, args.dtype, args.device)
    loop = EngineLoop(lambda: Engine(load_model(args.model, dtype, args.device), EngineConfig())).start()
    info = loop.info
    try:
        try:
            params.validate(info.vocab_size)                  # logit_bias's token ids, now the vocabulary is known
            grammar.check(params, info.grammars)              # the constraint compiles for this tokenizer
        except ValueError as e:
            print(f"baton: {e}", file=sys.stderr)
            return 2
        req = Request(uuid.uuid4().hex, encode_prompt(info.tokenizer, args.prompt, args.raw), params)
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
        from deploy.bench.run import main as bench_main
        return bench_main(argv[1:])
    args = build_parser(_command(argv) or "").parse_args(argv)   # `baton --help`, `--version`: no command's flags
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
