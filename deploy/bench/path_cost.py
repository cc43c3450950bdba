"""`baton bench path-cost`: what the request path costs in CPU per output token, per process.

Starts `baton up --http-port` (or, with `--launcher processes`, the same router, colocated worker and
HTTP gateway as plain processes: deploy/launch.py) serving a model whose own compute is negligible
(2 layers, hidden 64, a 256-word vocabulary, built here), drives N concurrent streaming
`/v1/completions` x T tokens (ignore_eos) from a client in another process, and reads from the OS the
CPU time (user + system, psutil) of every process the server started, before and after the load:

    baton bench path-cost [--launcher ray|processes] [--requests 256] [--tokens 200] [--repeats 1]

Each row: the process (router + gateway = `baton up` itself, each worker, Ray's daemons), its CPU
seconds during the load and µs of CPU per output token; then the total next to out tok/s. The load
generator is excluded. With --repeats R the load runs R times on the same server; the best
(least total CPU per token) is reported, since other work on a shared machine only ever adds.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

from deploy.bench.endpoint import _cpu_name
from deploy.launch import local_cluster, pools
from deploy.procs import Proc, free_port

RAY_OWN = ("IDLE", "DashboardAgent", "RuntimeEnvAgent")   # ray:: processes that are Ray's, not baton's
USAGE = re.compile(rb'"completion_tokens":(\d+)')


# ---- the model ---------------------------------------------------------------------------------
def tiny_model_dir(path: Path) -> str:
    """2 layers, hidden 64, 256 words (w3..w254), EOS 255: the path's cost, not the model's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=255, bos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 255)}, "</s>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(path)
    return str(path)


# ---- the load (run in its own process: python -m deploy.bench.path_cost --client ...) ---------------
async def _model(host: str, port: int) -> str:
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await r.read()
    w.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["data"][0]["id"]


async def _one(host: str, port: int, model: str, i: int, tokens: int) -> int:
    body = json.dumps({"model": model, "prompt": " ".join(f"w{3 + (i * 7 + k) % 250}" for k in range(16)),
                       "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    r, w = await asyncio.open_connection(host, port)
    w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await w.drain()
    tail = b""
    while chunk := await r.read(65536):
        tail = (tail + chunk)[-4096:]
    w.close()
    m = USAGE.findall(tail)
    return int(m[-1]) if m and b"[DONE]" in tail else 0


async def _load(url: str, n: int, tokens: int) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    model = await _model(host, int(port))
    t = time.perf_counter()
    got = await asyncio.gather(*(_one(host, int(port), model, i, tokens) for i in range(n)), return_exceptions=True)
    dt = time.perf_counter() - t
    ok = [g for g in got if isinstance(g, int) and g > 0]
    return {"seconds": dt, "output_tokens": sum(ok), "failed": n - len(ok)}


def drive(url: str, n: int, tokens: int) -> dict:
    """The load from another process; returns its summary."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "deploy.bench.path_cost", "--client", url, str(n), str(tokens)],
                         capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- CPU from the OS ---------------------------------------------------------------------------------
def role_of(p: psutil.Process, roots: dict[int, str]) -> str:
    if p.pid in roots:
        return roots[p.pid]
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    head = cmd.split()[0] if cmd else p.name()
    if "router.http_gateway" in cmd and "--api-server" in cmd:   # baton up --api-servers N's
        return "API server " + cmd.split("--api-server ", 1)[1].split()[0]
    if head.startswith("ray::") and head.removeprefix("ray::").split(".")[0] not in RAY_OWN:
        return "worker " + head.removeprefix("ray::").split(".")[0]      # an actor baton placed
    for name in ("gcs_server", "raylet", "log_monitor", "monitor.py", "dashboard", "runtime_env", *RAY_OWN):
        if name in cmd:
            return f"ray {name}"
    return "other " + p.name()


def cpu_snapshot(roots: dict[int, str]) -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds) for every process in the trees under `roots`."""
    out = {}
    for pid in roots:
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = (role_of(p, roots), t.user + t.system)
    return out


def measure(url: str, roots: dict[int, str], n: int, tokens: int) -> dict:
    before = cpu_snapshot(roots)
    load = drive(url, n, tokens)
    after = cpu_snapshot(roots)
    per: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        per[role] = per.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    toks = max(1, load["output_tokens"])
    return {**load, "tok_s": load["output_tokens"] / load["seconds"],
            "cpu_s": per, "us_per_token": {r: 1e6 * s / toks for r, s in per.items()},
            "total_us_per_token": 1e6 * sum(per.values()) / toks}


# ---- the server -----------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(args, model: str):
    """Yields (base URL, {root pid: role}); stops everything on leaving."""
    flags = ["--dtype", "float32", "--device", "cpu", "--max-batch", str(args.max_batch),
             "--max-queue", str(max(256, args.requests))]
    wflags = ["--threads", str(args.worker_threads)] if args.worker_threads else []
    with contextlib.ExitStack() as stack:
        if args.launcher == "ray":
            http = free_port()
            proc = Proc(["deploy.cli", "up", "--port", str(free_port()), "--http-port", str(http), "--model", model,
                         "--api-servers", str(args.api_servers), *flags], ready_timeout=600)
            stack.callback(proc.stop, 30)
            what = "router + gateway" if args.api_servers == 1 else "router"
            yield f"http://127.0.0.1:{http}", {proc.pid: f"baton up ({what})"}
        else:
            cluster = stack.enter_context(local_cluster(model, pools(colocated=1, flags=flags + wflags),
                                                        router_args=["--max-queue", str(max(256, args.requests))],
                                                        ready_timeout=600))
            gateway = Proc(["router.http_gateway", "--router", cluster.router.address, "--port", "0"])
            stack.callback(gateway.stop, 30)
            roots = {cluster.router.pid: "router", gateway.pid: "gateway"}
            roots.update({p.pid: f"worker {i}" for i, p in enumerate(cluster.decode)})
            yield f"http://{gateway.address}", roots


def table(r: dict, title: str) -> str:
    lines = [f"{title}: {r['output_tokens']} output tokens in {r['seconds']:.1f} s = {r['tok_s']:.0f} out tok/s, "
             f"{r['failed']} failed", "", "| process | CPU s | µs of CPU per output token |", "|---|---:|---:|"]
    for role in sorted(r["cpu_s"], key=lambda k: -r["cpu_s"][k]):
        lines.append(f"| {role} | {r['cpu_s'][role]:.2f} | {r['us_per_token'][role]:.0f} |")
    lines.append(f"| **all** | **{sum(r['cpu_s'].values()):.2f}** | **{r['total_us_per_token']:.0f}** |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="baton bench path-cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", default="ray", choices=["ray", "processes"],
                   help="ray: `baton up --http-port`; processes: router, colocated worker and gateway as plain "
                        "processes (default: ray)")
    p.add_argument("--requests", type=int, default=256, help="concurrent streaming requests (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=200, help="output tokens each (ignore_eos) (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=256, help="decode batch rows (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="loads on the same server; the best is reported "
                                                            "(default: %(default)s)")
    p.add_argument("--api-servers", type=int, default=1, metavar="N",
                   help="ray: `baton up --api-servers N`, N HTTP API processes on one port (default: %(default)s)")
    p.add_argument("--worker-threads", default=None,
                   help="--launcher processes: the worker's --threads, N or auto[:N] (default: the worker's own default)")
    p.add_argument("--model", default=None, help="model directory (default: a tiny random one, built here)")
    p.add_argument("--out", default=None, help="write results.json here (default: none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        print(json.dumps(asyncio.run(_load(argv[1], int(argv[2]), int(argv[3])))))
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="baton-path-cost-") as tmp:
        model = args.model or tiny_model_dir(Path(tmp))
        with serve(args, model) as (url, roots):
            drive(url, 8, 8)   # warm-up: first calls, connections, code paths
            runs = []
            for k in range(args.repeats):
                r = measure(url, roots, args.requests, args.tokens)
                print(table(r, f"run {k + 1}/{args.repeats}"), file=sys.stderr, flush=True)
                runs.append(r)
    best = min(runs, key=lambda r: r["total_us_per_token"])
    cpu = _cpu_name()
    servers = f" --api-servers {args.api_servers}" if args.api_servers != 1 else ""
    print(f"\nCPU: {cpu}, {psutil.cpu_count()} CPUs; {args.launcher}{servers}; {args.requests} x {args.tokens} tokens\n")
    print(table(best, "best"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"cpu": cpu, "args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
