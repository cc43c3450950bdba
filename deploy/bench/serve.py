"""`baton bench serve`: an open-loop load generator for any OpenAI-compatible server (baton's
HTTP gateway, vLLM, llama.cpp's llama-server). It reports what `vllm bench serve` reports.

    baton bench serve --base-url http://127.0.0.1:8000 [--model M] [--num-prompts 32]
        [--request-rate inf] [--max-concurrency N] [--dataset random|chat]
        [--endpoint completions|chat] [--goodput ttft:500 tpot:50] [--result-file out.json]

Python: run_serve_bench(ServeConfig(base_url=...)) -> dict; deploy.bench.serve_report.markdown_table
({name: result}) -> str.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx2 as httpx  # an httpx fork: pinned in requirements.lock, already a dependency of huggingface_hub
import numpy as np

from deploy.bench.serve_report import format_report
from deploy.bench.workload import load_tokenizer, prompt_texts



@dataclass
class ServeConfig:
    base_url: str
    model: str | None = None               # None: the first id from GET /v1/models
    endpoint: str = "completions"          # "completions" (/v1/completions) or "chat" (/v1/chat/completions)
    dataset: str = "random"                # "random" or "chat" (deploy/bench/prompts.txt)
    num_prompts: int = 32
    input_len: tuple[int, int] = (64, 192)  # inclusive range, tokens (random dataset)
    prefix_len: int = 0                    # tokens every random prompt starts with, the same for all
    output_len: tuple[int, int] = (32, 96)
    request_rate: float = math.inf         # Poisson arrivals (requests/s); inf = all at once
    max_concurrency: int | None = None
    seed: int = 0
    tokenizer: str = "smollm2"             # "smollm2", a tokenizer directory, or "none" (lengths in words)
    temperature: float = 0.0
    ignore_eos: bool = True
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms, keys ttft / tpot / e2el
    api_key: str | None = None             # None: $OPENAI_API_KEY if set
    timeout_s: float = 600.0
    progress: bool = True


@dataclass
class Prompt:
    text: str
    prompt_len: int
    output_len: int


@dataclass
class Outcome:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _random_text(rng, tokenizer, pool: np.ndarray, n: int) -> tuple[str, int]:
    """Text of random tokens that re-encodes to about n tokens (like vLLM's random dataset): a decode
    -> encode round trip can merge or split tokens, so trim or top up a few times and count again."""
    ids = rng.choice(pool, n).tolist()
    for _ in range(4):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n:
            return text, n
        ids = ids[:n] if len(ids) > n else ids + rng.choice(pool, n - len(ids)).tolist()
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def make_prompts(cfg: ServeConfig, tokenizer=None) -> list[Prompt]:
    """The seeded workload: the same config and tokenizer give the same prompts."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_prompts
    out_lens = rng.integers(cfg.output_len[0], cfg.output_len[1] + 1, n)
    texts = prompt_texts()
    if cfg.dataset == "chat":
        chosen = [texts[i] for i in rng.integers(0, len(texts), n)]
        lens = [len(tokenizer.encode(t, add_special_tokens=False)) if tokenizer else len(t.split()) for t in chosen]
        return [Prompt(t, k, int(o)) for t, k, o in zip(chosen, lens, out_lens)]
    if cfg.dataset != "random":
        raise ValueError(f"unknown dataset {cfg.dataset!r}: random or chat")
    in_lens, shared = rng.integers(cfg.input_len[0], cfg.input_len[1] + 1, n), np.random.default_rng([cfg.seed, 2])
    if tokenizer is None:  # common English words: about one token each
        words = np.array(sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())}))
        prefix = "".join(w + " " for w in shared.choice(words, cfg.prefix_len))
        return [Prompt(prefix + " ".join(rng.choice(words, k)), cfg.prefix_len + int(k), int(o))
                for k, o in zip(in_lens, out_lens)]
    special = set(tokenizer.all_special_ids)
    pool = np.array([i for i in range(len(tokenizer)) if i not in special])
    prefix, p_len = _random_text(shared, tokenizer, pool, cfg.prefix_len) if cfg.prefix_len else ("", 0)
    prefix += " " if prefix else ""   # word-level tokenizers would merge the two texts' edge words
    return [Prompt(prefix + text, p_len + k_len, int(o))
            for (text, k_len), o in ((_random_text(rng, tokenizer, pool, int(k)), o) for k, o in zip(in_lens, out_lens))]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send time of each request (s from the start): all 0 for a burst, else Poisson, first at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng([seed, 1])  # its own stream: the prompts do not change with the rate
    gaps = rng.exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


async def send(client: httpx.AsyncClient, cfg: ServeConfig, model: str, p: Prompt) -> Outcome:
    """One streamed request; times are taken when each SSE line arrives."""
    out = Outcome(prompt_len=p.prompt_len)
    chat = cfg.endpoint == "chat"
    body = {"model": model, "max_tokens": p.output_len, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    body.update({"messages": [{"role": "user", "content": p.text}]} if chat else {"prompt": p.text})
    chunks, usage_tokens = 0, None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return out
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                msg = json.loads(data)
                if msg.get("error"):
                    raise RuntimeError(f"error in stream: {msg['error']}")
                if usage := msg.get("usage"):  # with the last chunk, or alone after it (choices: [])
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
                for c in msg.get("choices") or []:  # a role-only chat delta is not a token
                    if (c.get("delta") or {}).get("content") if chat else c.get("text"):
                        if chunks == 0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last, chunks = now, chunks + 1
        out.e2el = time.perf_counter() - start
        out.output_tokens = usage_tokens if usage_tokens is not None else chunks
        out.success = chunks > 0
        out.error = "" if chunks else "the stream held no text"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(e).__name__}: {e}"
    return out


def _stats(name: str, values_s: list[float]) -> dict:
    if not values_s:  # None rather than NaN: the result stays plain JSON
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "p90", "p99")}
    ms = np.asarray(values_s) * 1e3
    pcts = {f"{stat}_{name}_ms": float(np.percentile(ms, q)) for stat, q in (("median", 50), ("p90", 90), ("p99", 99))}
    return {f"mean_{name}_ms": float(ms.mean()), **pcts}


def _tpot(o: Outcome) -> float:
    return (o.e2el - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0


def summarize(outcomes: list[Outcome], duration: float, goodput: dict[str, float] | None = None) -> dict:
    """vLLM's metrics: throughputs over the whole run, latency statistics over successful requests."""
    ok = [o for o in outcomes if o.success]
    inp, outp = sum(o.prompt_len for o in ok), sum(o.output_tokens for o in ok)
    res = {"duration": duration, "completed": len(ok), "failed": len(outcomes) - len(ok),
           "total_input_tokens": inp, "total_output_tokens": outp,
           "request_throughput": len(ok) / duration, "output_throughput": outp / duration,
           "total_token_throughput": (inp + outp) / duration}
    res.update(_stats("ttft", [o.ttft for o in ok]))
    res.update(_stats("tpot", [_tpot(o) for o in ok if o.output_tokens > 1]))
    res.update(_stats("itl", [x for o in ok for x in o.itl]))
    res.update(_stats("e2el", [o.e2el for o in ok]))
    if goodput:  # a request is good when it meets every SLO (ms)
        value = {"ttft": lambda o: o.ttft, "tpot": _tpot, "e2el": lambda o: o.e2el}
        good = sum(all(value[k](o) * 1e3 <= slo for k, slo in goodput.items()) for o in ok)
        res["request_goodput"] = good / duration
    res["errors"] = sorted({o.error for o in outcomes if not o.success})[:10]
    return res


async def _first_model(client: httpx.AsyncClient) -> str:
    try:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"could not list models at {client.base_url}v1/models ({e}); pass --model") from e


async def _progress(done: list[int], total: int, every: float = 2.0) -> None:
    while True:
        await asyncio.sleep(every)
        print(f"  bench serve: {done[0]}/{total} requests done", file=sys.stderr, flush=True)


async def bench(cfg: ServeConfig, prompts: list[Prompt]) -> dict:
    """Send the prompts on the arrival schedule (open loop: arrivals never wait on completions)."""
    key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    # trust_env=False: no proxy from the environment between the load generator and the server.
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout_s, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"} if key else {},
                                 trust_env=False) as client:
        model = cfg.model or await _first_model(client)
        arrivals = arrival_times(len(prompts), cfg.request_rate, cfg.seed)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
        done = [0]

        async def one(p: Prompt, at: float) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with gate:  # the clock starts once a slot is free, as in vLLM
                o = await send(client, cfg, model, p)
            done[0] += 1
            return o
        ticker = asyncio.create_task(_progress(done, len(prompts))) if cfg.progress else None
        t0 = time.perf_counter()
        try:
            outcomes = await asyncio.gather(*(one(p, at) for p, at in zip(prompts, arrivals)))
        finally:
            if ticker:
                ticker.cancel()
        duration = time.perf_counter() - t0
    res = summarize(outcomes, duration, cfg.goodput)
    res["config"] = {**asdict(cfg), "model": model, "api_key": None,  # JSON has no inf: say "inf" as vLLM does
                     "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate}
    res["requests"] = [{"prompt_len": o.prompt_len, "output_len": p.output_len, "output_tokens": o.output_tokens,
                        "arrival_s": at, "ttft_ms": o.ttft * 1e3, "e2el_ms": o.e2el * 1e3,
                        "itl_ms": [x * 1e3 for x in o.itl], "error": o.error}
                       for o, p, at in zip(outcomes, prompts, arrivals)]
    return res


def run_serve_bench(config: ServeConfig | dict) -> dict:
    """Build the workload and run it against config.base_url (blocking; call from outside an event loop)."""
    cfg = ServeConfig(**config) if isinstance(config, dict) else config
    return asyncio.run(bench(cfg, make_prompts(cfg, load_tokenizer(cfg.tokenizer))))


def _goodput(specs: list[str] | None) -> dict[str, float]:
    slos = {}
    for s in specs or []:
        k, _, v = s.partition(":")
        if k not in ("ttft", "tpot", "e2el") or not v:
            raise argparse.ArgumentTypeError(f"--goodput takes KEY:MS with KEY ttft, tpot or e2el, got {s!r}")
        slos[k] = float(v)
    return slos


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a required flag has no default to show; some say theirs in words
        return action.help if action.required or "(default" in (action.help or "") else super()._get_help_string(action)


def parse_args(argv=None) -> tuple[ServeConfig, str | None]:
    p = argparse.ArgumentParser(prog="baton bench serve", description=__doc__, formatter_class=_Help)
    a = p.add_argument
    a("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (no /v1) (required)")
    a("--model", default=None, help="model name to send (default: the first one GET /v1/models lists)")
    a("--endpoint", choices=["completions", "chat"], default="completions",
      help="completions: /v1/completions with a prompt; chat: /v1/chat/completions with one user message")
    a("--dataset", choices=["random", "chat"], default="random",
      help="random: random-token prompts of --input-len-min..max tokens; chat: the shipped chat prompts")
    a("--num-prompts", type=int, default=32, help="number of requests")
    a("--input-len-min", type=int, default=64, help="shortest random prompt (tokens)")
    a("--input-len-max", type=int, default=192, help="longest random prompt (tokens)")
    a("--prefix-len", type=int, default=0, help="tokens of one shared random prefix every random prompt starts with, "
      "on top of its own (vLLM's --random-prefix-len; measures prefix caching)")
    a("--output-len-min", type=int, default=32, help="fewest output tokens asked (max_tokens)")
    a("--output-len-max", type=int, default=96, help="most output tokens asked (max_tokens)")
    a("--request-rate", type=float, default=math.inf, help="Poisson arrival rate in requests/s; inf = all at once")
    a("--max-concurrency", type=int, default=None, help="most requests in flight at once (default: no cap)")
    a("--seed", type=int, default=0, help="seed for prompts, lengths and arrival times")
    a("--tokenizer", default="smollm2",
      help="tokenizer that sizes prompts: smollm2, a local tokenizer directory, or none (sizes in words)")
    a("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    a("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
      help="ask the server to generate exactly max_tokens (ignore_eos)")
    a("--goodput", nargs="+", metavar="KEY:MS", default=None,
      help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el; ms) (default: none)")
    a("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY when set, else no Authorization header)")
    a("--timeout", type=float, default=600.0, help="per-request connect/read timeout (s)")
    a("--result-file", default=None,
      help="write the result (metrics, config, per-request data) as JSON here (default: not written)")
    a("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    try:
        slos = _goodput(args.goodput)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if min(args.input_len_min, args.output_len_min, args.num_prompts) < 1 or \
            args.input_len_min > args.input_len_max or args.output_len_min > args.output_len_max:
        p.error("lengths and --num-prompts must be >= 1 and each min <= its max")
    cfg = ServeConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint, dataset=args.dataset,
                      num_prompts=args.num_prompts, input_len=(args.input_len_min, args.input_len_max),
                      prefix_len=max(0, args.prefix_len),
                      output_len=(args.output_len_min, args.output_len_max), request_rate=args.request_rate,
                      max_concurrency=args.max_concurrency, seed=args.seed, tokenizer=args.tokenizer,
                      temperature=args.temperature, ignore_eos=args.ignore_eos, goodput=slos,
                      api_key=args.api_key, timeout_s=args.timeout, progress=not args.no_progress)
    return cfg, args.result_file


def main(argv=None) -> int:
    cfg, result_file = parse_args(argv)
    prompts = make_prompts(cfg, load_tokenizer(cfg.tokenizer))
    print(f"bench serve: {len(prompts)} requests to {cfg.base_url}, prompts "
          f"{min(p.prompt_len for p in prompts)}–{max(p.prompt_len for p in prompts)} tokens, "
          f"rate {cfg.request_rate} req/s", file=sys.stderr, flush=True)
    try:
        result = asyncio.run(bench(cfg, prompts))
    except RuntimeError as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 1
    print(format_report(result))
    for err in result["errors"]:
        print(f"  error: {err}", file=sys.stderr)
    if result_file:
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
        print(f"bench serve: wrote {result_file}", file=sys.stderr)
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
