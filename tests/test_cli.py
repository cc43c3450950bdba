"""The `baton` command line explains itself: every flag has help and shows its default, the router's
address comes from BATON_ROUTER, a router that cannot be reached gets a one-line hint (no traceback),
and `baton status --json` prints 64-bit counters as numbers, the workers' batch size and their K/V
usage. Request limits default to the model's context, and a prompt too long for it is named as such
(gRPC and HTTP). Against an in-process router with no workers (Status and validation need none), and
`baton status` against a loopback cluster."""
from __future__ import annotations

import argparse
import json
import re

import grpc
import httpx2 as httpx
import pytest

from baton.v1 import router_pb2
from deploy.cli import build_parser, main
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


@pytest.mark.parametrize("command", ["up", "generate", "status", "scale"])
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
    assert "kv used" in table[1] and re.fullmatch(r"\d+\.\d%", table[2].split()[-2]), table
    assert table[1].endswith("prefix hits") and re.fullmatch(r"\d+\.\d%", table[2].split()[-1]), table


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
