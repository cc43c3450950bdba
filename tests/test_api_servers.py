"""`baton up --api-servers 2`: two HTTP API processes on one port (deploy/api_servers.py), each serving
streamed and unstreamed completions with generate()'s exact greedy tokens; both take requests; a scrape
of /metrics answers the same whichever process accepted it; `baton status` lists them; a killed one is
restarted; SIGTERM to baton up leaves none of them (checked by pid)."""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import random
import re
import signal

import psutil
import pytest

from deploy.procs import Proc, free_port, wait_for
from tiny_model import EOS, reference_greedy, save_tiny, save_tokenizer, tiny_llama

pytestmark = pytest.mark.slow(90)

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ref_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(path)
    http_port = free_port()
    proc = Proc(["deploy.cli", "up", "--port", "0", "--model", path, "--dtype", "float64", "--max-batch", "4",
                 "--http-port", str(http_port), "--api-server-count", "2", "--served-model-name", "tiny"],
                env=ENV, ready_timeout=180)
    state = {"proc": proc, "http_port": http_port, "router": proc.address, "api_pids": set()}
    yield state
    if proc.p.poll() is None:   # a test failed before the stop test: leave nothing behind
        proc.stop(20)
        for pid in state["api_pids"]:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
    """One request on a new connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", "Connection": "close"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _complete(port: int, prompt: list[int], n: int, stream: bool) -> tuple[list[int], str]:
    """Greedy token ids of one completion (streamed or not) and the API server that served it."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    status, headers, data = _request(port, "POST", "/v1/completions", body)
    assert status == 200, data
    if not stream:
        return json.loads(data)["choices"][0]["token_ids"], headers["x-baton-api-server"]
    events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    ids = [t for e in events[:-1] for t in (json.loads(e)["choices"][0].get("token_ids") or [])]
    return ids, headers["x-baton-api-server"]


def _status(up):
    from router.client import RouterClient
    with RouterClient(up["router"]) as client:
        return client.status()


def _series(text: str, names: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([^#\s{]+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1).startswith(names):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


COUNTED = ("baton_http_requests", "baton_api_server_http_requests", "baton_generated_tokens", "baton_ttft_seconds",
           "vllm:generation_tokens", "vllm:request_success", "vllm:e2e_request_latency_seconds_count",
           "baton_requests_total")


def test_two_api_servers_serve_exact_greedy_tokens_and_both_take_requests(up, ref_model):
    rng = random.Random(5)
    served = set()
    for _ in range(6):   # which server accepts a connection is the kernel's choice: load both
        prompts = [[rng.randrange(3, EOS) for _ in range(rng.randint(1, 30))] for _ in range(8)]
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _complete(up["http_port"], prompts[i], 6, stream=i % 2 == 1), range(8)))
        for p, (ids, by) in zip(prompts, results):
            assert ids == reference_greedy(ref_model, p, 6, ignore_eos=True)
            served.add(by)
        if served == {"1", "2"}:
            break
    assert served == {"1", "2"}, f"only API server(s) {served} took requests"
    _, _, text = _request(up["http_port"], "GET", "/metrics")
    s = _series(text.decode(), COUNTED)
    per_server = [s.get(f'baton_api_server_http_requests_total{{api_server="{k}"}}', 0) for k in ("1", "2")]
    assert all(n > 0 for n in per_server), s
    total = s['baton_http_requests_total{code="200",endpoint="completions"}']
    assert sum(per_server) == total == s['baton_requests_total{outcome="completed"}']   # each counted once
    assert s['vllm:generation_tokens_total{model_name="tiny"}'] == 6 * total == s["baton_generated_tokens_total"]


def test_metrics_are_the_same_whichever_server_answers(up):
    scrapes = {}
    for _ in range(40):
        _, headers, text = _request(up["http_port"], "GET", "/metrics")
        scrapes.setdefault(headers["x-baton-api-server"], []).append(_series(text.decode(), COUNTED))
        if len(scrapes) == 2 and min(map(len, scrapes.values())) >= 2:
            break
    assert set(scrapes) == {"1", "2"}, "one API server answered every scrape"
    first = scrapes["1"][0]
    assert first and all(s == first for ss in scrapes.values() for s in ss)


def test_every_metric_the_dashboards_query_is_exported_from_the_shared_files(up):
    from test_metrics_names import NOT_EXPORTED, VLLM_DASHBOARD_NAMES, dashboard_metric_names
    _, _, text = _request(up["http_port"], "GET", "/metrics")
    exported = {line.split("{")[0].split(" ")[0] for line in text.decode().splitlines() if not line.startswith("#")}
    missing = (VLLM_DASHBOARD_NAMES - NOT_EXPORTED | dashboard_metric_names()) - exported
    assert not missing, missing


def test_status_lists_the_api_servers(up):
    st = _status(up)
    servers = sorted(st.api_servers, key=lambda a: a.index)
    assert [a.index for a in servers] == [1, 2] and all(a.alive for a in servers)
    assert {a.address for a in servers} == {f"127.0.0.1:{up['http_port']}"}
    children = {p.pid for p in psutil.Process(up["proc"].pid).children()}
    assert {a.pid for a in servers} <= children
    up["api_pids"] |= {a.pid for a in servers}
    from deploy.status_view import api_servers_line
    assert api_servers_line(st.api_servers).startswith("API servers: 2 of 2 running")


def test_a_killed_api_server_is_restarted_and_its_counts_stay(up, ref_model):
    before = _series(_request(up["http_port"], "GET", "/metrics")[2].decode(), COUNTED)
    victim = next(a for a in _status(up).api_servers if a.index == 1)
    psutil.Process(victim.pid).send_signal(signal.SIGKILL)

    def restarted():
        a = next(a for a in _status(up).api_servers if a.index == 1)
        return a if a.alive and a.pid != victim.pid and a.restarts == 1 else None
    new = wait_for(restarted, 60, what="API server 1 to be restarted")
    up["api_pids"].add(new.pid)
    p = [7, 8, 9]
    for stream in (False, True):
        assert _complete(up["http_port"], p, 5, stream)[0] == reference_greedy(ref_model, p, 5, ignore_eos=True)
    after = _series(_request(up["http_port"], "GET", "/metrics")[2].decode(), COUNTED)
    for name, value in before.items():   # the dead process's counts are kept (counters never go back)
        assert after[name] >= value, name


def test_sigterm_stops_baton_up_and_every_api_server(up):
    up["api_pids"] |= {a.pid for a in _status(up).api_servers}
    assert len(up["api_pids"]) >= 3   # two, and the restarted one
    assert up["proc"].stop(20) == 0
    alive = [pid for pid in up["api_pids"] if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"API server processes left after baton up stopped: {alive}"


# ---- deploy/api_servers.py alone (no router needed to start, nor Ray) ----------------------------------
def test_an_api_server_that_cannot_start_is_reported_and_none_is_left():
    from deploy.api_servers import ApiServers
    fatal = []
    servers = ApiServers("127.0.0.1:1", "127.0.0.1", 0, 2, ["--no-such-flag"], fatal.append)
    with pytest.raises(RuntimeError, match=r"API server 1 \(pid \d+\) exited with code 2"):
        servers.start(timeout_s=60)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in servers.pids())


def test_api_servers_share_one_socket_restart_a_dead_one_and_stop_all():
    from deploy.api_servers import ApiServers
    fatal = []
    servers = ApiServers("127.0.0.1:1", "127.0.0.1", 0, 2, [], fatal.append)
    try:
        servers.start(timeout_s=120)
        first = servers.pids()
        by = {_request(servers.port, "GET", "/version")[1]["x-baton-api-server"] for _ in range(4)}
        assert by <= {"1", "2"} and by
        psutil.Process(first[0]).kill()
        wait_for(lambda: servers.pb()[0].alive and servers.pb()[0].pid != first[0], 60,
                 what="API server 1 to be restarted")
        assert [a.restarts for a in servers.pb()] == [1, 0] and not fatal
        assert _request(servers.port, "GET", "/version")[0] == 200
    finally:
        pids = servers.pids()
        servers.stop()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_api_servers_end_when_the_process_that_started_them_is_killed():
    """SIGKILL leaves baton up no time to stop them: each gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    code = ("import sys, time; from deploy.api_servers import ApiServers; "
            "s = ApiServers('127.0.0.1:1', '127.0.0.1', 0, 2, [], print); s.start(120); "
            "print('PIDS', *s.pids(), flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = next(line for line in parent.stdout if line.startswith("PIDS"))
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in pids), 15, what="the API servers to end with their parent")
