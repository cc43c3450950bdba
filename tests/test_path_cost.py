"""`baton bench path-cost` reads CPU from the OS per process and names each one (deploy/bench/path_cost.py);
the load itself runs only in the benchmark, never here."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from deploy.bench.path_cost import cpu_snapshot, role_of, table


def _proc(pid: int, cmd: str):
    return SimpleNamespace(pid=pid, cmdline=lambda: cmd.split(), name=lambda: cmd.split()[0])


def test_each_process_is_named_by_what_it_is():
    roots = {1: "baton up (router + gateway)"}
    assert role_of(_proc(1, "python -m deploy.cli up"), roots) == "baton up (router + gateway)"
    assert role_of(_proc(2, "ray::WorkerActor.serve"), roots) == "worker WorkerActor"
    assert role_of(_proc(3, "ray::IDLE"), roots) == "ray IDLE"
    assert role_of(_proc(4, "ray::DashboardAgent"), roots) == "ray DashboardAgent"
    assert role_of(_proc(5, "/x/ray/core/src/ray/raylet/raylet --foo"), roots) == "ray raylet"
    assert role_of(_proc(6, "/x/gcs_server --bar"), roots) == "ray gcs_server"
    assert role_of(_proc(7, "python -m router.http_gateway --router 127.0.0.1:5 --fd 9 --api-server 2 --parent-pid 1"),
                   roots) == "API server 2"   # baton up --api-servers N's


def test_a_snapshot_covers_the_tree_under_each_root():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snap = cpu_snapshot({os.getpid(): "me"})
        assert snap[os.getpid()][0] == "me" and snap[os.getpid()][1] > 0
        assert child.pid in snap
    finally:
        child.kill()
        child.wait()


def test_the_table_adds_up():
    r = {"output_tokens": 1000, "seconds": 2.0, "tok_s": 500.0, "failed": 0, "cpu_s": {"a": 0.03, "b": 0.01},
         "us_per_token": {"a": 30.0, "b": 10.0}, "total_us_per_token": 40.0}
    out = table(r, "t")
    assert "| a | 0.03 | 30 |" in out and "**40**" in out and "500 out tok/s" in out
