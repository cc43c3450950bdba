"""Nothing `baton up` starts listens beyond loopback unless the user asks (issue 23): every listening
socket of every process it started (its process tree and its Ray session's daemons), in each
topology; with --host 0.0.0.0 only the router's gRPC port and the HTTP port are on the wildcard
address, and `baton serve --host 0.0.0.0` opens the HTTP port alone. Stopping it leaves no process
and no port behind. (The disaggregated cluster of test_ray_deploy.py is checked with default flags
there.)"""
from __future__ import annotations

import argparse

import psutil
import pytest

from deploy.procs import Proc, free_port, wait_for
from listening import beyond_loopback, listeners, processes, still_listening
from tiny_model import save_tiny, save_tokenizer

pytestmark = pytest.mark.slow(60)

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(path)   # the HTTP gateway renders text
    return path


def _up(model_dir: str, flags: list[str]):
    """`baton up` with these flags and a free HTTP port: _serve_and_list's."""
    http_port = free_port()
    return _serve_and_list(["up", "--port", "0", "--model", model_dir, "--http-port", str(http_port), *flags],
                           http_port)


def _serve_and_list(argv: list[str], http_port: int):
    """`baton ARGV...` (the tiny model in float64); one request through its router, then every
    listening socket of its processes. Stops it and checks that no process or port outlives it."""
    proc = Proc(["deploy.cli", *argv, "--dtype", "float64", "--max-batch", "4"], env=ENV, ready_timeout=180)
    procs = []
    try:
        router_port = int(proc.address.rsplit(":", 1)[1])
        from router.client import RouterClient
        with RouterClient(f"127.0.0.1:{router_port}") as client:   # workers, K/V path and all in use
            assert len(client.complete([5, 9, 200], max_new_tokens=4, ignore_eos=True)[1]) == 4
        procs = processes(proc.pid)
        found = listeners(procs)
    finally:
        procs = procs or processes(proc.pid)
        rc = proc.stop(20)
        try:
            wait_for(lambda: not _alive(procs), 10, what="every process of baton up to exit")
        finally:
            for p in _alive(procs):   # the test fails; nothing it started outlives it
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
    assert rc == 0
    left = still_listening({(s.ip, s.port) for s in found})
    assert not left, f"still listening after baton up stopped: {left}"
    return found, router_port, http_port


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _check_started_everything(found, router_port: int, http_port: int) -> None:
    """The scan saw the router, the gateway, Ray's daemons and the workers (it would pass on nothing)."""
    names = " ".join(s.process for s in found)
    assert {router_port, http_port} <= {s.port for s in found}, found
    for daemon in ("gcs_server", "raylet", "ray::WorkerActor"):
        assert daemon in names, f"no listening socket of {daemon} among {[str(s) for s in found]}"
    # nor more: Ray's prestarted idle worker would wait for tasks baton never runs, waking ~200 times a second
    assert "ray::IDLE" not in names, [str(s) for s in found]


def test_colocated_default_flags_listen_on_loopback_only(model_dir):
    found, router_port, http_port = _up(model_dir, [])
    _check_started_everything(found, router_port, http_port)
    exposed = beyond_loopback(found)
    assert not exposed, "listening beyond loopback: " + ", ".join(map(str, exposed))


def test_disaggregated_host_0_0_0_0_opens_only_the_router_and_http_ports(model_dir):
    found, router_port, http_port = _up(model_dir, ["--host", "0.0.0.0", "--prefill-workers", "1",
                                                    "--decode-workers", "1"])
    _check_started_everything(found, router_port, http_port)
    exposed = beyond_loopback(found, allowed={router_port, http_port})
    assert not exposed, "listening beyond loopback, unasked: " + ", ".join(map(str, exposed))
    wildcard = {s.port for s in found if s.ip not in ("127.0.0.1", "::1")}
    assert wildcard == {router_port, http_port}, found


@pytest.mark.parametrize("http_host", [None, "0.0.0.0"])
def test_two_api_servers_listen_only_on_the_http_host_on_one_socket(model_dir, http_host):
    """--api-servers 2: both API server processes accept on the HTTP port's one socket, which baton up bound on
    --http-host (loopback by default); nothing else of theirs listens, and the router stays on loopback."""
    found, router_port, http_port = _up(model_dir, ["--api-servers", "2", *(["--http-host", http_host] if http_host
                                                                           else [])])
    _check_started_everything(found, router_port, http_port)
    exposed = beyond_loopback(found, allowed={http_port} if http_host else set())
    assert not exposed, "listening beyond loopback, unasked: " + ", ".join(map(str, exposed))
    api = [s for s in found if "router.http_gateway" in s.process or s.port == http_port]
    assert {(s.ip, s.port) for s in api} == {(http_host or "127.0.0.1", http_port)}, [str(s) for s in api]
    assert len({s.pid for s in api if "router.http_gateway" in s.process}) == 2, [str(s) for s in api]


def test_serve_host_0_0_0_0_opens_only_the_http_port(model_dir):
    """vLLM's line: --host names the HTTP API's address; the gRPC router stays on --grpc-host (127.0.0.1)."""
    http_port = free_port()
    found, router_port, _ = _serve_and_list(["serve", model_dir, "--host", "0.0.0.0", "--port", str(http_port),
                                             "--grpc-port", "0"], http_port)
    _check_started_everything(found, router_port, http_port)
    exposed = beyond_loopback(found, allowed={http_port})
    assert not exposed, "listening beyond loopback, unasked: " + ", ".join(map(str, exposed))
    assert {s.port for s in found if s.ip not in ("127.0.0.1", "::1")} == {http_port}, found


def test_ray_dashboard_is_off_unless_asked_and_refused_plainly_without_its_packages(monkeypatch):
    from deploy import ray_node
    parser = argparse.ArgumentParser()
    ray_node.add_args(parser)
    assert parser.parse_args([]).ray_dashboard is False
    import ray._private.utils
    monkeypatch.setattr(ray._private.utils, "get_dashboard_dependency_error", lambda: ImportError("aiohttp"))
    with pytest.raises(SystemExit, match=r"ray\[default\]"):   # before anything starts
        ray_node.start(argparse.Namespace(address=None, **vars(parser.parse_args(["--ray-dashboard"]))), workers=1)
