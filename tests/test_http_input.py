"""Hostile HTTP input to the OpenAI-compatible gateway: every malformed, oversized or slow request
gets a 4xx with an OpenAI-shaped error (never a 5xx, never a retryable 429), and idle or
half-sent connections are closed. One gateway over an in-process router with no workers: none
of these requests may reach a worker."""
from __future__ import annotations

import socket
import time

import httpx2 as httpx
import pytest

from tiny_model import save_tiny

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from router.main import start_router
    server, port, _, watcher = start_router(save_tiny(tmp_path_factory.mktemp("tiny") / "model"), "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        watcher.stopped.set()
        server.stop(0).wait(2)


@pytest.fixture(scope="module")
def url(router):
    from router.http_gateway import start_gateway
    gw = start_gateway(router, "127.0.0.1", 0)
    try:
        yield gw.url
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def strict(router):
    """A gateway with small limits: 1 MiB bodies, 0.5 s keep-alive, 1 s to send a request head."""
    from router.http_gateway import HttpLimits, start_gateway
    gw = start_gateway(router, "127.0.0.1", 0, limits=HttpLimits(max_body_bytes=MiB, keep_alive_s=0.5,
                                                                  header_timeout_s=1.0, body_timeout_s=1.0))
    try:
        yield gw
    finally:
        gw.stop()


def _post(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "Traceback" not in err["message"] and "CLIENT:" not in err["message"], err
    return err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", rb'{"prompt": "w5 \ud800 w6", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": "w5", "stop": ["\udfff"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "hi \ud800"}]}', "messages"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages"),
])
def test_lone_surrogate_is_400_naming_the_field(url, path, body, param):
    err = _error(_post(url, path, body), 400)
    assert err["param"] == param and "surrogate" in err["message"], err


@pytest.mark.parametrize("path, field", [
    ("/v1/completions", "max_tokens"),
    ("/v1/chat/completions", "max_tokens"),
    ("/v1/chat/completions", "max_completion_tokens"),
    ("/v1/completions", "top_k"),
])
def test_integer_beyond_uint32_is_400_naming_the_field(url, path, field):
    body = {"prompt": "w5"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "w5"}]}
    r = httpx.post(url + path, json={**body, field: 2**32}, timeout=30)
    err = _error(r, 400)
    assert err["param"] == field and field in err["message"], err


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "content part 1 has type 'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "content part 1 has type 'input_audio'"),
    ({"text": "w6"}, "content part 1 has no type"), ("w6", "content part 1 is a str"),
    ({"type": "text", "text": 6}, "content part 1: its text must be a string")])
def test_non_text_content_part_is_400_naming_its_type(url, part, words):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5"}, part]}]}
    err = _error(httpx.post(url + "/v1/chat/completions", json=body, timeout=30), 400)
    assert err["param"] == "messages" and err["message"].startswith("messages[0].content: " + words), err
    assert "function-after" not in err["message"] and "ContentPart" not in err["message"], err


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": ' * 100_000, b'{"prompt": "w5", "stream_options": '
                                  + b'{"a": ' * 200 + b"1" + b"}" * 201], ids=["arrays", "objects", "in-a-field"])
def test_deeply_nested_json_is_400(url, body):
    err = _error(_post(url, "/v1/completions", body), 400)
    assert "nest" in err["message"], err


def test_nan_and_infinity_are_400(url):
    for word in (b"NaN", b"Infinity", b"-Infinity"):
        err = _error(_post(url, "/v1/completions", b'{"prompt": "w5", "temperature": ' + word + b"}"), 400)
        assert "JSON" in err["message"], err


def _raw(gw, data: bytes) -> socket.socket:
    s = socket.create_connection((gw.host, gw.port), timeout=5)
    s.sendall(data)
    return s


def _read_response(s: socket.socket) -> bytes:
    out = b""
    while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < int(
            out.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def test_body_over_the_limit_is_413_from_content_length_before_it_is_read(strict):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (50 * MiB))
    s = _raw(strict, head + b'{"prompt": "' + b"w" * 1000)   # 1 kB of the announced 50 MB, then nothing
    t0 = time.monotonic()
    with s:
        resp = _read_response(s)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert b'"code":"body_too_large"' in resp.replace(b" ", b"") and time.monotonic() - t0 < 2.0


def test_chunked_body_over_the_limit_is_413(strict):
    def chunks():
        for _ in range(64):
            yield b"w" * 65536
    r = httpx.post(strict.url + "/v1/completions", content=chunks(), timeout=30)
    assert _error(r, 413)["code"] == "body_too_large"
    assert httpx.post(strict.url + "/v1/completions", content=b"{", timeout=30).status_code == 400  # still serving


def _refused(gw) -> float:
    """The gateway's count of 413 answers to /v1/completions (its metric baton_http_requests_total)."""
    for line in httpx.get(gw.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith('baton_http_requests_total{code="413",endpoint="completions"}'):
            return float(line.split()[-1])
    return 0.0


def test_request_over_the_grpc_limit_is_413_not_429(router):
    """The body fits the HTTP limit but the gRPC message would not: 413, counted, without gRPC's words."""
    from router.http_gateway import HttpLimits, start_gateway
    gw = start_gateway(router, "127.0.0.1", 0, limits=HttpLimits(max_body_bytes=64 * MiB))
    try:
        before = _refused(gw)
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "w5 " * (3 * MiB), "max_tokens": 2}, timeout=60)
        err = _error(r, 413)
        assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large", err
        assert err["param"] == "prompt" and str(8 * MiB) in err["message"], err
        assert _refused(gw) == before + 1
    finally:
        gw.stop()


def test_idle_connection_is_closed_after_the_keep_alive_timeout(strict):
    with _raw(strict, b"") as s:
        t0 = time.monotonic()
        assert s.recv(100) == b""      # closed by the server, nothing sent
        assert 0.3 < time.monotonic() - t0 < 3
    with _raw(strict, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") as s:   # and after a response
        assert _read_response(s).startswith(b"HTTP/1.1")
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 3


def test_slow_request_head_is_cut_after_the_header_timeout(strict):
    with _raw(strict, b"GET /health HTTP/1.1\r\n") as s:
        t0 = time.monotonic()
        s.settimeout(0.2)
        closed = False
        while not closed and time.monotonic() - t0 < 5:
            try:
                s.sendall(b"X-Slow: 1\r\n")   # a byte now and then keeps no connection alive
                closed = s.recv(100) == b""
            except socket.timeout:
                pass
            except OSError:
                closed = True
        assert closed and time.monotonic() - t0 < 3


def test_stalled_body_is_408(strict):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with _raw(strict, head + b'{"prompt": ') as s:
        t0 = time.monotonic()
        resp = _read_response(s)
    assert resp.startswith(b"HTTP/1.1 408"), resp[:200]
    assert time.monotonic() - t0 < 3


def test_connections_over_the_cap_get_503(router):
    from router.http_gateway import HttpLimits, start_gateway
    gw = start_gateway(router, "127.0.0.1", 0, limits=HttpLimits(max_connections=2))
    try:
        with _raw(gw, b""), _raw(gw, b""):
            time.sleep(0.2)
            assert httpx.get(gw.url + "/v1/models", timeout=10).status_code == 503
        time.sleep(0.2)
        assert httpx.get(gw.url + "/v1/models", timeout=10).status_code == 200
    finally:
        gw.stop()


def test_text_prompt_over_max_prompt_chars_is_400_naming_the_flag(tmp_path):
    """The text-prompt cap is the router's --max-prompt-chars (`baton up` too), and the 400 names it."""
    from deploy.cli import build_parser
    from router import limits
    from router.http_gateway import start_gateway
    from router.main import start_router
    up = build_parser().parse_args(["up", "--max-prompt-chars", "10"])
    assert limits.from_args(up).max_prompt_chars == 10 and limits.Limits().max_prompt_chars == 65536
    server, port, _, watcher = start_router(save_tiny(tmp_path / "model"), "127.0.0.1", 0, limits=limits.from_args(up))
    gw = start_gateway(f"127.0.0.1:{port}", "127.0.0.1", 0)
    try:
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "w5 w6 w7 w8", "max_tokens": 2}, timeout=30)
        err = _error(r, 400)
        assert err["param"] == "prompt" and "11 characters; at most 10" in err["message"], err
        assert "--max-prompt-chars" in err["message"], err
    finally:
        gw.stop()
        watcher.stopped.set()
        server.stop(0).wait(2)


def test_every_gateway_flag_says_its_default_and_baton_up_passes_the_http_limits():
    from deploy.cli import build_parser
    from router.http_gateway import HttpLimits, config, server
    for action in server.build_parser()._actions:
        assert action.help == "show this help message and exit" or "default" in (action.help or ""), action
    up = build_parser().parse_args(["up", "--http-keep-alive", "2", "--http-max-connections", "7",
                                    "--max-message-bytes", "1000"])
    assert config.from_args(up, up.max_message_bytes) == HttpLimits(keep_alive_s=2, max_connections=7,
                                                                    max_message_bytes=1000)
