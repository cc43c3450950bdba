"""`baton up` and `baton serve`: their flags (the model's shared with `baton generate`), the vLLM
flags baton refuses with the reason (refusal()), and the checks of values made before anything
starts (bad_value()). Imports nothing heavy: `baton up --help` builds this parser alone."""
from __future__ import annotations

import argparse
import os


def add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    from baton.worker_process import DTYPE_HELP, DTYPE_NAMES
    what = ("smollm2 (built in: SmolLM2-135M-Instruct, Q4_1 dequantised to float32) or a local Hugging Face "
            "model directory")
    if positional:
        p.add_argument("model", nargs="?", default="smollm2", help=what + " (default: %(default)s)")
    else:
        p.add_argument("--model", default="smollm2", help=what)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help=DTYPE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def add_args(u: argparse.ArgumentParser, serve: bool = False) -> None:
    """`baton up`'s flags; `serve`: `baton serve`'s, vLLM's serve line (the model positional, --host and
    --port those of the HTTP API, the router on --grpc-host / --grpc-port)."""
    if serve:
        add_model_args(u, positional=True)
        u.add_argument("--host", default="127.0.0.1", help="address the OpenAI HTTP API listens on")
        u.add_argument("--port", type=int, default=8000, help="the OpenAI HTTP API's port")
        u.add_argument("--grpc-host", default="127.0.0.1", help="address the gRPC router listens on")
        u.add_argument("--grpc-port", type=int, default=50051, help="the gRPC router's port")
    else:
        u.add_argument("--host", default="127.0.0.1", help="address the router (and the HTTP API, unless "
                                                           "--http-host) listen on")
        u.add_argument("--port", type=int, default=50051, help="the router's gRPC port")
        add_model_args(u)
    u.add_argument("--prefill-workers", type=int, default=None,
                   help="dedicated prefill workers (disaggregated pools; default: 1 with --decode-workers, "
                        "none on one device (colocated workers), half the GPUs on two or more)")
    u.add_argument("--decode-workers", type=int, default=None,
                   help="dedicated decode workers (disaggregated pools; default: 1 with --prefill-workers, "
                        "none on one device (colocated workers), the other half of the GPUs on two or more)")
    u.add_argument("--colocated-workers", type=int, default=None,
                   help="workers that each serve prefill and decode in one process, K/V in memory "
                        "(default where prefill and decode would share a device: 1)")
    u.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=32,
                   help="rows in a decode worker's running batch: requests it decodes at once (--max-num-seqs: "
                        "vLLM's name)")
    from baton.worker_process import add_engine_args
    add_engine_args(u)  # --prefix-cache-mb, --max-model-len, --kv-cache-memory, --gpu-memory-utilization, ...
    from baton import kv_transport
    kv_transport.add_arg(u)  # --kv-transport grpc|nixl (passed to every worker: deploy/cluster.py)
    from router import limits as request_limits
    request_limits.add_args(u)  # --max-queue (router and decode workers), --max-new-tokens, ...
    u.add_argument("--address", default=None,
                   help="join this Ray cluster (default: start a local one for this process)")
    from deploy import ray_node
    ray_node.add_args(u)  # --ray-dashboard
    u.add_argument("--worker-host", default="127.0.0.1", help="address workers bind (their node's IP on a cluster)")
    if not serve:
        u.add_argument("--http-port", type=int, default=None,
                       help="also serve an OpenAI-compatible HTTP API on this port (default: none)")
        u.add_argument("--http-host", default=None,
                       help="address the HTTP API listens on (default: --host's), e.g. 0.0.0.0 to expose the "
                            "HTTP API alone while the router stays on 127.0.0.1")
    u.add_argument("--api-servers", "--api-server-count", dest="api_servers", type=int, default=1, metavar="N",
                   help="processes serving the OpenAI HTTP API, all on its one port (vLLM's --api-server-count): "
                        "1 serves it in this process; more start N processes that share one listening socket and "
                        "the router, for when one saturates a core (default: %(default)s)")
    from router.http_gateway import config as http_config
    http_config.add_args(u)  # --served-model-name, --request-timeout, --http-max-body-bytes, ...
    u.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template, a file's path or the template itself, used instead of the "
                        "model's own for chat requests (default: the model's, from its tokenizer_config.json)")
    u.add_argument("--auth-token", "--api-key", dest="auth_token", default=os.environ.get("BATON_AUTH_TOKEN"),
                   help="clients (gRPC and HTTP, as `Authorization: Bearer KEY`) must send this token; --api-key "
                        "is vLLM's name (default: $BATON_AUTH_TOKEN, else none)")
    u.add_argument("--tls-cert", help="the servers' TLS certificate, PEM (default: none, plain TCP)")
    u.add_argument("--tls-key", help="its private key, PEM (default: none)")
    u.add_argument("--tls-root-cert", help="CA that signed the workers' certificates (default: none)")
    u.add_argument("--tls-mutual", action="store_true",
                   help="workers demand a client certificate signed by --tls-root-cert (mutual TLS between workers)")
    _add_refused_args(u)


def _add_refused_args(p: argparse.ArgumentParser) -> None:
    """vLLM flags that baton cannot honour: accepted by the parser so that the refusal names them and says
    why (refusal()), rather than argparse's "unrecognized arguments"."""
    g = p.add_argument_group("vLLM flags baton refuses (with the reason)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="1 only: a worker holds the whole model on one device; more GPUs serve more workers")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N",
                   help="1 only: a worker runs every layer; more GPUs serve more workers")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="refused: baton runs only Llama-family models with transformers' own code, never code "
                        "from a model directory")


def refusal(args: argparse.Namespace) -> str | None:
    """Why a vLLM flag given to `baton up` / `baton serve` cannot be honoured (None: nothing refused)."""
    more = ("to use more GPUs, run more workers: --colocated-workers N, or --prefill-workers N --decode-workers M "
            "(one per GPU)")
    if args.tensor_parallel_size != 1:
        return (f"--tensor-parallel-size {args.tensor_parallel_size}: not supported: a baton worker holds the "
                f"whole model on one device (no sharding of its weights); {more}")
    if args.pipeline_parallel_size != 1:
        return (f"--pipeline-parallel-size {args.pipeline_parallel_size}: not supported: a baton worker runs "
                f"every layer of the model on one device; {more}")
    if args.trust_remote_code:
        return ("--trust-remote-code: not supported: baton runs only Llama-family models with the code of "
                "transformers it ships with (its own model runner), never Python code from a model directory")
    return None


def bad_value(args) -> str | None:
    """What is wrong with an engine flag's value, before anything starts; --chat-template read (and set
    for the router and the HTTP API, which tokenise chat prompts in this process)."""
    if not 0 < args.gpu_memory_utilization <= 1:
        return f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}"
    if not 1 <= args.api_servers <= 64:
        return f"--api-servers (--api-server-count) must be in [1, 64], got {args.api_servers}"
    if args.api_servers > 1 and args.http_port is None:
        return f"--api-servers {args.api_servers} needs the HTTP API: give --http-port"
    if args.max_batch < 1:
        return f"--max-batch (--max-num-seqs) must be >= 1, got {args.max_batch}"
    from baton import model_files
    if args.max_model_len:
        try:
            context = int(model_files.model_config(args.model).get("max_position_embeddings", 2048))
        except (OSError, ValueError):
            context = None   # no such model: the router says so
        if context and not 0 < args.max_model_len <= context:
            return (f"--max-model-len must be in [1, {context}] (the model's max_position_embeddings), or 0 for "
                    f"that; got {args.max_model_len}")
    if args.chat_template:
        try:
            os.environ[model_files.CHAT_TEMPLATE_ENV] = model_files.chat_template_text(args.chat_template)
        except (OSError, ValueError) as e:
            return str(e)
    return None
