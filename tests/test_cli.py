"""The `baton` command line explains itself: every flag has help and shows its default, the router's
address comes from BATON_ROUTER, a router that cannot be reached gets a one-line hint (no traceback),
and `baton status --json` prints 64-bit counters as numbers, the workers' batch size and their K/V
usage. Request limits default to the model's context, and a prompt too long for it is named as such
(gRPC and HTTP). Against an in-process router with no workers (Status and validation need none), and
`baton status` against a loopback cluster. vLLM's habits: its flag names, `baton serve MODEL` end to end
(an OpenAI request answered, SIGTERM leaves no process), `baton --version`, flags refused by name, and a
CLI module that imports no torch, Ray or gRPC (its speed is measured in docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import time

import grpc
import httpx2 as httpx
import psutil
import pytest

from baton.v1 import router_pb2
from deploy.cli import build_parser, main
from deploy.procs import ROOT, Proc
from loopback import loopback_cluster
from router import limits as request_limits
from test_http_input import router  # noqa: F401 - the fixture: an in-process router, no workers
from tiny_model import save_tiny

CONTEXT = 1024   # the tiny model's max_position_embeddings


def _help_entries(argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """`baton ARGV --help` as {flag: its help text} (a wide terminal: a flag's help is on its line or
    the next, indented)."""
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    entries, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            invocation, _, text = line[2:].partition("  ")
            flag = re.match(r"-+[\w-]+", invocation).group(0)
            entries[flag] = text.strip()
        elif flag and line.startswith("    "):
            entries[flag] = (entries[flag] + " " + line.strip()).strip()
        else:
            flag = None
    return entries


def _check_help(entries: dict[str, str], flags: set[str]) -> None:
    assert flags and flags <= set(entries), flags - set(entries)
    for flag in flags:
        text = entries[flag]
        assert ("default" in text or "(required)" in text) and "default: None" not in text, (flag, text)
        assert not text.startswith("(default"), (flag, "no help text, only a default")


@pytest.mark.parametrize("command", ["up", "serve", "generate", "status", "scale"])
def test_every_flag_has_help_that_shows_its_default(command, capsys, monkeypatch):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    _check_help(_help_entries([command], capsys, monkeypatch),
                {a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help"})


@pytest.mark.parametrize("bench", [[], ["serve"], ["endpoint"], ["topologies"]])
def test_every_bench_flag_has_help_that_shows_its_default(bench, capsys, monkeypatch):
    """`baton bench` and its modes have parsers of their own: every flag they list."""
    entries = _help_entries(["bench", *bench], capsys, monkeypatch)
    _check_help(entries, set(entries) - {"-h"})


def test_baton_router_is_the_default_router_address(monkeypatch):
    monkeypatch.setenv("BATON_ROUTER", "10.1.2.3:7000")
    for argv in (["generate", "hi"], ["status"], ["scale", "decode", "2"]):
        assert build_parser().parse_args(argv).router == "10.1.2.3:7000"
    assert build_parser().parse_args(["status", "--router", "h:1"]).router == "h:1"   # the flag wins
    monkeypatch.delenv("BATON_ROUTER")
    assert build_parser().parse_args(["status"]).router == "127.0.0.1:50051"


def test_status_json_via_baton_router_prints_64_bit_counters_as_integers(router, capsys, monkeypatch):
    monkeypatch.setenv("BATON_ROUTER", router)
    assert main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    stats = st["stats"]
    for name in ("completed", "failed", "cancelled", "rejected", "kv_bytes", "running"):
        assert type(stats[name]) is int, (name, stats[name])
    assert st["model"].endswith("model") and st["workers"] == []


@pytest.mark.parametrize("argv", [["generate", "hello"], ["status"], ["scale", "decode", "2"]])
def test_unreachable_router_gets_a_one_line_hint(argv, capsys):
    assert main([*argv, "--router", "127.0.0.1:1"]) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert "127.0.0.1:1" in lines[0] and "--router" in lines[0] and "BATON_ROUTER" in lines[0]


def test_up_help_names_every_flag_with_its_default(capsys, monkeypatch):
    entries = _help_entries(["up"], capsys, monkeypatch)
    for flag in ("--request-timeout", "--served-model-name", "--max-batch", "--max-new-tokens", "--max-prompt-tokens",
                 "--auth-token", "--tls-cert", "--host", "--port", "--dtype", "--device"):
        assert "default" in entries[flag], (flag, entries[flag])
    for flag in ("--max-new-tokens", "--max-prompt-tokens"):
        assert "the model's context" in entries[flag], entries[flag]
    assert build_parser().parse_args(["up", "--request-timeout", "7.5"]).request_timeout == 7.5


def test_limit_flags_explain_themselves_where_they_are_defined():
    """router.limits gives every flag its help (the router's own --help as well as `baton up`'s)."""
    p = argparse.ArgumentParser()
    request_limits.add_args(p)
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help and "default" in a.help, a.option_strings


def test_limits_default_to_the_model_context(tmp_path):
    from router.main import start_router
    up = build_parser().parse_args(["up"])
    assert request_limits.from_args(up).for_context(CONTEXT) == request_limits.Limits(
        max_prompt_tokens=CONTEXT, max_new_tokens=CONTEXT)
    chosen = request_limits.from_args(build_parser().parse_args(["up", "--max-new-tokens", "16"]))
    assert chosen.for_context(CONTEXT).max_new_tokens == 16   # a flag given wins
    server, _, servicer, watcher = start_router(save_tiny(tmp_path / "model"), "127.0.0.1", 0)
    try:
        assert servicer.limits.max_new_tokens == servicer.limits.max_prompt_tokens == CONTEXT
    finally:
        watcher.stopped.set()
        server.stop(0).wait(2)


OVER = "the prompt has 1000 tokens; with {}=64 it exceeds the model's context of 1024 tokens"


def test_over_context_error_names_the_prompt_over_grpc(router):  # noqa: F811
    from router.client import RouterClient
    with RouterClient(router) as client, pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=[1] * 1000, max_new_tokens=64),
                                  timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == OVER.format("max_new_tokens")
    with RouterClient(router) as client, pytest.raises(grpc.RpcError) as e:   # within the context, over the cap
        list(client.stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=[1] * 1025, max_new_tokens=1),
                                  timeout=10))
    assert e.value.details().startswith("the prompt has 1025 tokens; at most 1024 allowed"), e.value.details()


def test_over_context_error_names_the_prompt_over_http(router):  # noqa: F811
    from router.http_gateway import start_gateway
    gw = start_gateway(router, "127.0.0.1", 0)
    try:
        r = httpx.post(gw.url + "/v1/completions", json={"model": "model", "prompt": [1] * 1000, "max_tokens": 64},
                       timeout=30)
    finally:
        gw.stop()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == OVER.format("max_tokens")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router and one colocated worker started with --max-batch 8 (loopback_cluster's)."""
    with loopback_cluster(save_tiny(tmp_path_factory.mktemp("tiny") / "model"), colocated=1) as c:
        yield c


def test_status_reports_the_workers_max_batch(cluster, capsys):
    assert main(["status", "--json", "--router", cluster["router"].address]) == 0
    assert json.loads(capsys.readouterr().out)["max_batch"] == 8   # loopback_cluster's --max-batch


def test_status_shows_kv_usage_and_prefix_cache_hits_per_worker(cluster, capsys):
    from router.client import RouterClient
    address = cluster["router"].address
    with RouterClient(address) as client:
        stream = client.generate_stream(list(range(1, 101)), max_new_tokens=900, ignore_eos=True, timeout=60)
        try:
            next(stream)   # decoding: the worker's batch holds this request's K/V for ~1 s at least
            assert main(["status", "--json", "--router", address]) == 0
        finally:
            stream.cancel()
    st = json.loads(capsys.readouterr().out)
    [w] = st["workers"]
    assert w["role"] == "colocated" and type(w["kv_usage_percent"]) is float and 0 < w["kv_usage_percent"] <= 100, w
    assert type(st["max_batch"]) is int
    assert main(["status", "--router", address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "kv used prefix hits" in table[1] and re.search(r" \d+\.\d% +\d+\.\d%( |$)", table[2]), table


def test_router_keeps_max_batch_from_the_workers_stats():
    """What Status fills StatusResponse.max_batch from: the decode-side workers' Stats replies."""
    from types import SimpleNamespace

    from router.registry import max_batch, worker_stats
    reply = dict(running=1, waiting=0, batch_width=9, kv_cache_bytes=100, kv_used_bytes=25)
    workers = [SimpleNamespace(role="decode", stats=worker_stats(SimpleNamespace(**reply, max_batch=8))),
               SimpleNamespace(role="colocated", stats=worker_stats(SimpleNamespace(**reply, max_batch=16))),
               SimpleNamespace(role="prefill", stats=worker_stats(SimpleNamespace(**reply, max_batch=99)))]
    assert max_batch(workers) == 16 and max_batch(workers[2:]) == 0 and max_batch([]) == 0
    assert worker_stats(SimpleNamespace(**reply))["max_batch"] == 0   # a worker that does not report it


def test_generate_local_honours_the_sampling_flags_and_refuses_bad_ones(tmp_path, capsys):
    """`baton generate --local` passes penalties, min_tokens, logit_bias and json_schema to the
    engine: a +100 bias on one token makes every greedy token that one; a malformed or
    out-of-vocabulary bias, or a schema that is no JSON object or no file, is one clear line and
    exit 2."""
    from tiny_model import save_tiny, save_tokenizer
    model = save_tiny(tmp_path / "m")
    save_tokenizer(model)
    base = ["generate", "w5 w6 w7", "--local", "--raw", "--model", model, "--max-new-tokens", "4", "--ignore-eos"]
    assert main([*base, "--logit-bias", "9=100", "--presence-penalty", "0.5", "--min-tokens", "2"]) == 0
    assert capsys.readouterr().out.split() == ["w9"] * 4
    for bad, words in ((["--logit-bias", "9:100"], "TOKEN_ID=BIAS"), (["--logit-bias", "9999=1"], "logit_bias"),
                       (["--repetition-penalty", "0"], "repetition_penalty"), (["--json-schema", "[1]"], "JSON object"),
                       (["--json-schema", f"@{tmp_path}/none.json"], "none.json")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_generate_local_follows_a_json_schema_a_choice_or_a_regex_and_refuses_what_it_cannot_use(tmp_path, capsys):
    import json

    from tiny_model import save_char_tokenizer, save_tiny
    model = save_tiny(tmp_path / "m")
    save_char_tokenizer(model)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    base = ["generate", "ab", "--local", "--raw", "--model", model, "--max-new-tokens", "20"]
    assert main([*base, "--json-schema", f"@{schema}"]) == 0
    assert json.loads(capsys.readouterr().out) in ({"ok": True}, {"ok": False})
    assert main([*base, "--choice", "yes", "--choice", 'no "way"']) == 0
    assert capsys.readouterr().out.strip() in ("yes", 'no "way"')
    assert main([*base, "--regex", "[0-9]{3}-[a-z]{2}"]) == 0
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", capsys.readouterr().out.strip())
    for bad, words in ((["--json-schema", '{"type": "nonsense"}'], "nonsense"), (["--regex", "[a-"], "regex"),
                       (["--grammar", "root ::= ("], "grammar")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and ".cc:" not in err and len(err.strip().splitlines()) == 1, err


# ---- vLLM's habits (issue 22): its flags, `baton serve MODEL`, --version, a CLI that imports nothing heavy

def _baton(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_version_and_help_answer():
    from importlib.metadata import version
    r = _baton("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"baton {version('baton')}", (r.stdout, r.stderr)
    r = _baton("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "--version" in r.stdout, r.stderr
    for command in ("up", "serve", "status"):
        assert _baton(command, "--help").returncode == 0


def test_the_cli_imports_no_torch_ray_or_grpc_before_a_command_needs_them():
    """What makes `baton --help`, `--version` and `status` answer at once (timed in docs/benchmarks.md):
    the module and the parser of --help / status import neither torch, Ray nor gRPC."""
    code = ("import sys\nfrom deploy.cli import build_parser\nbuild_parser('')\nbuild_parser('status')\n"
            "print(' '.join(m for m in ('torch', 'ray', 'grpc', 'transformers', 'fastapi') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "", (r.stdout, r.stderr)


def test_vllm_flag_names_are_aliases_of_batons_own():
    a = build_parser().parse_args(["up", "--api-key", "k", "--max-num-seqs", "4", "--max-model-len", "512",
                                   "--kv-cache-memory", "2GiB", "--gpu-memory-utilization", "0.5", "--enforce-eager",
                                   "--api-server-count", "3"])
    assert (a.auth_token, a.max_batch, a.max_model_len, a.kv_cache_memory, a.gpu_memory_utilization, a.enforce_eager,
            a.api_servers) == ("k", 4, 512, 2 << 30, 0.5, True, 3)
    assert build_parser().parse_args(["serve", "--api-server-count", "2"]).api_servers == 2
    assert build_parser().parse_args(["up"]).api_servers == 1
    assert a.dtype == "auto" and a.http_host is None and a.host == "127.0.0.1"


def test_serve_is_vllms_serve_line():
    """`baton serve MODEL`: --host/--port are the HTTP API's (8000 as vLLM's), the router on --grpc-host /
    --grpc-port (loopback:50051); cmd_serve turns it into `baton up`'s namespace."""
    from deploy import cli
    a = build_parser().parse_args(["serve", "/m", "--host", "0.0.0.0", "--api-key", "k", "--served-model-name", "s",
                                   "--max-num-seqs", "8", "--dtype", "auto"])
    assert (a.model, a.host, a.port, a.grpc_host, a.grpc_port, a.served_model_name) == \
        ("/m", "0.0.0.0", 8000, "127.0.0.1", 50051, "s")
    seen = {}
    cli_up = cli.cmd_up
    try:
        cli.cmd_up = lambda args: seen.setdefault("args", args) and 0
        cli.cmd_serve(a)
    finally:
        cli.cmd_up = cli_up
    up = seen["args"]
    assert (up.host, up.port, up.http_host, up.http_port) == ("127.0.0.1", 50051, "0.0.0.0", 8000)
    assert build_parser().parse_args(["serve"]).model == "smollm2"


@pytest.mark.parametrize("argv, words", [
    (["--tensor-parallel-size", "2"], ["--tensor-parallel-size 2", "not supported", "one device"]),
    (["-tp", "4"], ["--tensor-parallel-size 4", "not supported"]),
    (["--pipeline-parallel-size", "2"], ["--pipeline-parallel-size 2", "not supported"]),
    (["--trust-remote-code"], ["--trust-remote-code", "Llama-family", "never Python code"]),
    (["--max-model-len", "5000"], ["--max-model-len", "[1, 1024]", "5000"]),
    (["--gpu-memory-utilization", "1.5"], ["--gpu-memory-utilization", "(0, 1]"]),
    (["--chat-template", "/no/such/file"], ["--chat-template", "no such file"]),
    (["--chat-template", "{% if %}"], ["--chat-template", "does not compile"]),
    (["--api-server-count", "0"], ["--api-servers (--api-server-count)", "[1, 64]", "got 0"]),
])
def test_flags_baton_cannot_honour_are_refused_by_name_with_the_reason(argv, words, tiny_dir, capsys):
    for command in ("up", "serve"):
        model = ["--model", tiny_dir] if command == "up" else [tiny_dir]
        assert main([command, *model, *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_api_servers_without_the_http_api_are_refused(tiny_dir, capsys):
    assert main(["up", "--model", tiny_dir, "--api-servers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--api-servers 2 needs the HTTP API" in err and "--http-port" in err, err


def test_engine_flags_reach_the_workers_engine_config():
    """baton up's engine flags -> a worker's command line (engine_argv) -> its EngineConfig."""
    from baton.worker_process import engine_argv, engine_config, parse_args
    up = build_parser().parse_args(["up", "--max-model-len", "300", "--kv-cache-memory", "64MB",
                                    "--gpu-memory-utilization", "0.7", "--enforce-eager", "--prefix-cache-mb", "8",
                                    "--max-num-batched-tokens", "1024", "--step-time-budget", "150"])
    for role in ("prefill", "decode"):
        cfg = engine_config(parse_args(role, engine_argv(up)))
        assert (cfg.max_model_len, cfg.kv_cache_memory, cfg.gpu_memory_utilization, cfg.enforce_eager,
                cfg.prefix_cache_mb, cfg.prefill_chunk_tokens, cfg.step_time_ms) == (300, 64_000_000, 0.7, True, 8, 1024, 150)
    default = engine_config(parse_args("decode", []))
    assert default.enforce_eager is False and default.step_time_ms is None    # off: the token budget
    assert engine_config(parse_args("decode", ["--step-time-budget", "auto"])).step_time_ms == 0.0


def test_byte_sizes():
    from baton.worker_process import byte_size
    assert [byte_size(t) for t in ("1073741824", "2GiB", "512MB", "1.5G", "3 KiB", "10b")] == \
        [1 << 30, 2 << 30, 512_000_000, 1_500_000_000, 3072, 10]
    for bad in ("x", "2QB", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)


def test_dtype_auto_is_float32_on_cpu_and_the_models_own_on_a_gpu(tiny_dir):
    from baton import kv_codec
    from baton.model_loader import resolve_dtype
    from baton.worker_process import DTYPE_NAMES
    assert tuple(kv_codec.DTYPES) == DTYPE_NAMES   # the CLI's names, without importing torch
    assert resolve_dtype(tiny_dir, "auto", "cpu") == "float32"
    assert resolve_dtype(tiny_dir, "auto", "cuda") == "float64"   # the tiny model's config.json says so
    assert resolve_dtype(tiny_dir, "bfloat16", "cuda") == "bfloat16"


def test_max_model_len_caps_the_routers_context(tmp_path):
    from router.main import capped_context, start_router
    from router.client import RouterClient
    assert capped_context(CONTEXT, 0) == CONTEXT and capped_context(CONTEXT, 100) == 100
    with pytest.raises(ValueError, match=r"--max-model-len must be in \[1, 1024\]"):
        capped_context(CONTEXT, CONTEXT + 1)
    server, port, servicer, watcher = start_router(save_tiny(tmp_path / "model"), "127.0.0.1", 0, max_model_len=100)
    try:
        assert servicer.limits.max_new_tokens == servicer.limits.max_prompt_tokens == 100
        with RouterClient(f"127.0.0.1:{port}") as client, pytest.raises(grpc.RpcError) as e:
            list(client.stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=[1] * 90, max_new_tokens=20),
                                      timeout=10))
        assert e.value.details() == ("the prompt has 90 tokens; with max_new_tokens=20 it exceeds the model's "
                                     "context of 100 tokens"), e.value.details()
    finally:
        watcher.stopped.set()
        server.stop(0).wait(2)


def test_chat_template_from_a_file_or_inline_replaces_the_models(tmp_path, monkeypatch):
    from baton import model_files
    from tiny_model import save_tokenizer
    model = save_tiny(tmp_path / "m")
    save_tokenizer(model)
    template = "{% for m in messages %}w7 {{ m['content'] }} w8 {% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert model_files.chat_template_text(str(tmp_path / "t.jinja")) == template == \
        model_files.chat_template_text(template)
    monkeypatch.setenv(model_files.CHAT_TEMPLATE_ENV, template)
    tok, _ = model_files.load_tokenizer(model)
    assert tok.decode(model_files.encode_prompt(tok, "w5")) == "w7 w5 w8"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _tree(pid: int) -> list:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list) -> list:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@pytest.mark.slow(30)
def test_baton_serve_answers_openai_requests_and_stops_on_sigterm_leaving_nothing(tiny_dir):
    """vLLM's serve line on the tiny model: the OpenAI API on its port (a free one here) behind --api-key,
    --max-model-len enforced, the URL in the log; SIGTERM stops every process, and the log's figure is
    the one measured from outside."""
    proc = Proc(["deploy.cli", "serve", tiny_dir, "--port", "0", "--grpc-port", "0", "--api-key", "k1",
                 "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "auto", "--served-model-name", "smol",
                 "--gpu-memory-utilization", "0.8"],
                env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=180)
    tree = _tree(proc.pid)
    try:
        ready = next(line for line in proc.log if line.startswith("BATON_READY"))
        url = dict(kv.split("=", 1) for kv in ready.split()[1:])["http"]
        assert url.startswith("http://127.0.0.1:") and f"OpenAI API on {url}/v1" in "".join(proc.log)
        auth = {"Authorization": "Bearer k1"}
        body = {"model": "smol", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        assert httpx.post(url + "/v1/completions", json=body, timeout=10).status_code == 401
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 600}, headers=auth, timeout=10)
        assert r.status_code == 400 and "[1, 512]" in r.json()["error"]["message"], r.text
        [card] = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()["data"]
        assert (card["id"], card["max_model_len"]) == ("smol", 512), card
        tree = _tree(proc.pid)
        assert len(tree) > 3   # Ray's processes and the worker
        t = time.monotonic()
        proc.signal(signal.SIGTERM)
        while _alive(tree) and time.monotonic() - t < 15:
            time.sleep(0.02)
        took = time.monotonic() - t
        assert not _alive(tree), [p.pid for p in _alive(tree)]
        assert proc.wait_or_kill(5) == 0
        said = float(re.search(r"stopped in ([0-9.]+) s", "".join(proc.log)).group(1))
        assert said <= took + 0.1 and took - said < 1.0, (said, took)
    finally:
        proc.kill()
        for p in _alive(tree):
            p.kill()


def test_up_on_an_http_port_in_use_says_so_at_once_before_starting_ray(tiny_dir):
    """baton up binds its HTTP socket first: a taken port is an error in a second, not after the
    cluster came up (and nothing takes the port while Ray starts)."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "deploy.cli", "up", "--model", tiny_dir, "--port", "0",
                              "--http-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use" in out.stderr, out.stderr
    assert "starting Ray" not in out.stderr and "Traceback" not in out.stderr, out.stderr
