"""The `baton` command line explains itself: every flag has help and shows its default, the router's
address comes from BATON_ROUTER, a router that cannot be reached gets a one-line hint (no traceback),
and `baton status --json` prints 64-bit counters as numbers. Against an in-process router with no
workers (Status needs none)."""
from __future__ import annotations

import json
import re

import pytest

from baton.cli import build_parser, main
from test_http_input import router  # noqa: F401 - the fixture: an in-process router, no workers


def _help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """`baton COMMAND --help` as {flag: its help text} (a wide terminal: a flag's help is on its line or
    the next, indented)."""
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
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


@pytest.mark.parametrize("command", ["up", "generate", "status", "scale"])
def test_every_flag_has_help_that_shows_its_default(command, capsys, monkeypatch):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    flags = {a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help"}
    entries = _help_entries(command, capsys, monkeypatch)
    assert flags and flags <= set(entries), flags - set(entries)
    for flag in flags:
        text = entries[flag]
        assert "default" in text and "default: None" not in text, (flag, text)
        assert not text.startswith("(default"), (flag, "no help text, only a default")


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
