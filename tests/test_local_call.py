"""The HTTP gateway in the router's process (`baton up`): Generate called in process (router/local_call.py)
keeps what the gRPC hop gave — exact tokens, a client that goes away frees its row, a deadline ends the
request, the router's errors reach the client as the same 4xx, a stopped worker's streams migrate exactly."""
import json

import httpx2 as httpx
import pytest

from baton.v1 import router_pb2
from deploy.procs import Proc, wait_for
from loopback import stop_with_a_stalled_stream
from tiny_model import save_tiny, save_tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from router.client import RouterClient
    from router.http_gateway import start_gateway
    from router.main import start_router
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(model_dir)
    server, port, servicer, watcher = start_router(model_dir, "127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    worker = Proc(["decode_service", "--colocated", "--port", "0", "--model", model_dir, "--router", address,
                   "--dtype", "float64", "--threads", "1", "--max-batch", "8"])
    gateways = []
    try:
        wait_for(lambda: watcher.serving, 60, what="the router serving")

        def gateway(local: bool = True, **kw):
            gw = start_gateway(address, "127.0.0.1", 0, local_router=servicer if local else None, **kw)
            gateways.append(gw)
            return gw
        with RouterClient(address) as client:
            handle = gateway()
            yield {"gateway": gateway, "handle": handle, "url": handle.url, "grpc": client}
    finally:
        for gw in gateways:
            gw.stop()
        worker.stop()
        watcher.stopped.set()
        server.stop(0).wait(2)


def _idle(client) -> bool:
    s = client.stats()
    return s.running == 0 and s.waiting == 0


def test_the_in_process_call_gives_the_grpc_call_s_tokens_streamed_or_not(env):
    from router.local_call import LocalRouterStub
    assert isinstance(env["handle"].app.state.gateway.stub, LocalRouterStub)   # the path under test
    want = [t for m in env["grpc"].stub.Generate(router_pb2.GenerateRequest(
        prompt="w5 w6 w7", raw=True, max_new_tokens=12, temperature=0, ignore_eos=True), timeout=30)
        for t in m.token_ids]
    body = {"prompt": "w5 w6 w7", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(env["url"] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    with httpx.stream("POST", env["url"] + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert [t for e in events for t in e["choices"][0].get("token_ids") or []] == want and len(want) == 12
    wait_for(lambda: env["grpc"].stats().completed >= 3, 10, what="three requests counted completed")


def test_a_client_that_goes_away_frees_its_row_and_its_relay_thread(env):
    client, before = env["grpc"], env["grpc"].stats()
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", env["url"] + "/v1/completions",
                      json={"prompt": "w40 w41", "max_tokens": 1000, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert r.status_code == 200 and any(next(lines).startswith("data: ") for _ in range(4))
    wait_for(lambda: client.stats().cancelled > before.cancelled and _idle(client), 10, what="the cancel freed the row")
    stub = env["handle"].app.state.gateway.stub   # the relay ended too: no thread left waiting for tokens
    wait_for(lambda: stub.running == 0, 10, what="every relay returned")
    assert client.stats().failed == before.failed


def test_a_deadline_ends_the_request_with_504_and_frees_its_row(env):
    client, before = env["grpc"], env["grpc"].stats()
    gw = env["gateway"](request_timeout_s=0.5)
    r = httpx.post(gw.url + "/v1/completions", json={"prompt": "w9", "max_tokens": 1000, "ignore_eos": True},
                   timeout=30)
    assert r.status_code == 504, r.text
    wait_for(lambda: _idle(client) and client.stats().completed == before.completed, 10, what="the row freed")


def test_the_router_s_refusal_is_the_same_400_naming_the_field(env):
    r = httpx.post(env["url"] + "/v1/completions", json={"prompt": "   ", "max_tokens": 4}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and err["type"] == "invalid_request_error", r.text


def test_stopping_the_gateway_with_an_open_stream_is_quick_and_frees_the_row(env):
    gw = env["gateway"]()
    assert stop_with_a_stalled_stream(gw) < 2.5
    wait_for(lambda: _idle(env["grpc"]), 10, what="the stream's row freed")
    wait_for(lambda: gw.app.state.gateway.stub.running == 0, 10, what="its relay returned")


def _choices(body: dict) -> list:
    return [{k: v for k, v in c.items()} for c in body["choices"]]


def _streamed(url: str, body: dict) -> dict:
    """index -> (text, finish_reason) of a streamed completion."""
    out: dict = {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text, fin = out.get(c["index"], ("", None))
                    out[c["index"]] = (text + c["text"], c["finish_reason"] or fin)
    return out


@pytest.mark.parametrize("body", [
    {"prompt": "w7 w8 w9", "max_tokens": 10, "temperature": 0, "logprobs": 2, "stop": ["w40"]},
    {"prompt": ["w3 w4", "w5 w6 w7"], "max_tokens": 6, "temperature": 0.9, "seed": 11, "n": 2, "ignore_eos": True},
])
def test_the_in_process_gateway_answers_as_the_grpc_gateway_does(env, body):
    """The same requests through a gateway that calls the router over gRPC and through the in-process
    one: the same choices (texts, token logprobs, finish reasons), streamed or not, and every request
    counted completed."""
    remote = env["gateway"](local=False)
    client, before = env["grpc"], env["grpc"].stats()
    a = httpx.post(env["url"] + "/v1/completions", json=body, timeout=60)
    b = httpx.post(remote.url + "/v1/completions", json=body, timeout=60)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert _choices(a.json()) == _choices(b.json()) and a.json()["usage"] == b.json()["usage"]
    assert _streamed(env["url"], body) == _streamed(remote.url, body) == {
        c["index"]: (c["text"], c["finish_reason"]) for c in a.json()["choices"]}
    wait_for(lambda: _idle(client), 10, what="every request settled")
    assert client.stats().completed - before.completed == 4 * len(a.json()["choices"])
    assert client.stats().failed == before.failed and client.stats().cancelled == before.cancelled


def test_chat_streams_through_the_in_process_call(env):
    body = {"model": "model", "messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", env["url"] + "/v1/chat/completions", json=body, timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_a_handler_that_sees_its_deadline_first_still_ends_the_call_deadline_exceeded():
    """The handler stops at its deadline (is_active turns false) and returns, as the router's does; its
    end reaches the event loop before the loop's own deadline timer: the reader must get
    DEADLINE_EXCEEDED, not an end of stream (a 502 'ended before the finish' instead of a 504)."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import grpc.aio

    from router.local_call import LocalCall, Outbox

    def handler(request, context):
        while context.is_active():
            yield router_pb2.GenerateResponse(text="m", token_ids=[7])
            time.sleep(0.01)

    async def main():
        call = LocalCall(handler, "msg", (), 0.1, ThreadPoolExecutor(1), Outbox(asyncio.get_running_loop()))
        time.sleep(0.3)   # the loop busy: the handler's end is queued before the timer can fire
        got = []
        with pytest.raises(grpc.RpcError) as e:
            while (m := await call.read()) is not grpc.aio.EOF:
                got.append(m)
        return got, e.value.code(), await call.code()
    got, code, final = asyncio.run(main())
    assert got and code == final == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(m.text == "m" * len(m.token_ids) for m in got)


def test_a_reader_slower_than_the_messages_gets_them_merged_in_order_with_the_last_ones_finish():
    """Messages queued behind the one a read takes come with it (a gateway slower than the steps sends
    fewer, larger chunks): texts joined, token ids in order, the first's request id and the last's
    finish and usage; messages pushed from another thread (the router's relay) keep their order."""
    import asyncio
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc.aio

    from router.local_call import LocalCall, Outbox

    def handler(request, context):
        first = router_pb2.GenerateResponse(text="a", token_ids=[1], request_id="r")
        first.usage.prompt_tokens = 3
        context.push(first)
        pushed = threading.Thread(target=lambda: [context.push(router_pb2.GenerateResponse(text=t, token_ids=[i]))
                                                  for i, t in ((2, "b"), (3, "c"))])
        pushed.start()
        pushed.join()
        last = router_pb2.GenerateResponse(text="d", token_ids=[4], finish_reason=1)
        last.usage.prompt_tokens, last.usage.completion_tokens = 3, 4
        yield last

    async def main():
        call = LocalCall(handler, "req", (), 5.0, ThreadPoolExecutor(1), Outbox(asyncio.get_running_loop()))
        time.sleep(0.2)   # the loop busy while all four messages arrive
        return await call.read(), await call.read()
    msg, end = asyncio.run(main())
    assert (msg.text, list(msg.token_ids), msg.request_id, msg.finish_reason) == ("abcd", [1, 2, 3, 4], "r", 1)
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens) == (3, 4) and end is grpc.aio.EOF


def test_streams_through_the_in_process_call_migrate_exactly_when_their_worker_stops(tmp_path):
    """The relay that runs on the link's reader thread (router/request_run.py, the gateway in the
    router's process) fails over as the threaded one does: two colocated workers, a stream on each,
    one worker stopped mid-stream; both streams end with the greedy tokens of an uninterrupted run."""
    import signal
    import threading

    from deploy.procs import stop_all
    from router.config import RouterConfig
    from router.http_gateway import start_gateway
    from router.main import start_router
    from tiny_model import engine_greedy, tiny_llama

    long = 950   # the stop must land mid-stream (prompts <= 30 tokens, context 1024)
    prompts = [[5 + i, 9, 200, 31, 7 + i] for i in range(2)]
    want = engine_greedy(tiny_llama(), prompts, long)
    model_dir = save_tiny(tmp_path / "model")
    save_tokenizer(model_dir)
    server, port, servicer, watcher = start_router(model_dir, "127.0.0.1", 0, config=RouterConfig(worker_silence_s=2.0))
    address = f"127.0.0.1:{port}"
    workers = [Proc(["decode_service", "--colocated", "--port", "0", "--model", model_dir, "--router", address,
                     "--dtype", "float64", "--threads", "1", "--max-batch", "4"]) for _ in range(2)]
    gw = None
    try:
        wait_for(lambda: watcher.serving and len(servicer.registry.live("decode")) == 2, 60, what="two workers")
        gw = start_gateway(address, "127.0.0.1", 0, local_router=servicer)
        under_way, got = [threading.Event(), threading.Event()], [None, None]

        def stream(i: int) -> None:
            body = {"prompt": prompts[i], "max_tokens": long, "temperature": 0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True}
            ids = []
            with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
                        if ids:
                            under_way[i].set()
            got[i] = ids
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in under_way)   # both streams under way: one on each worker (least loaded)
        workers[0].signal(signal.SIGSTOP)
        try:
            for t in threads:
                t.join(60)
        finally:
            workers[0].signal(signal.SIGCONT)
        assert got == want
        assert servicer.books.snapshot()[2]["migrations"] >= 1
    finally:
        if gw is not None:
            gw.stop()
        stop_all(workers)
        watcher.stopped.set()
        server.stop(0).wait(2)
