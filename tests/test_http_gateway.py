"""The OpenAI-compatible HTTP gateway, driven by the official `openai` client, in front of a loopback
cluster (router + 1 prefill + 1 decode process) serving the tiny float64 model with a tiny tokenizer."""
from __future__ import annotations

import json
import random
import time

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from deploy.procs import Proc, wait_for
from loopback import loopback_cluster, stop_with_a_stalled_stream
from tiny_model import EOS, reference_greedy, save_tiny, save_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from router.client import RouterClient
    from router.http_gateway import start_gateway
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(model_dir)
    with loopback_cluster(model_dir, prefill=1, decode=1, router_args=["--metrics-port", "0"]) as c:
        router = c["router"]
        metrics_addr = next(line.split("=", 1)[1].strip() for line in router.log if line.startswith("BATON_METRICS"))
        gw = start_gateway(router.address, "127.0.0.1", 0)
        try:
            with RouterClient(router.address) as grpc_client:
                yield {**c, "gateway": gw, "url": f"http://127.0.0.1:{gw.port}", "grpc": grpc_client,
                       "model_dir": model_dir, "metrics_addr": metrics_addr,
                       "oa": OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0,
                                    timeout=30)}
        finally:
            gw.stop()


@pytest.fixture(scope="module")
def ref_model():
    return tiny_llama()


def _words(rng, n):
    return " ".join(f"w{rng.randrange(3, EOS)}" for _ in range(n))


def test_models_and_health(env):
    models = env["oa"].models.list()
    assert [m.id for m in models.data] == ["model"]
    assert env["oa"].models.retrieve("model").id == "model"
    r = httpx.get(env["url"] + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["router"] == "SERVING"


def test_completions_greedy_equals_grpc_and_generate(env, ref_model):
    oa, rng = env["oa"], random.Random(3)
    prompt = _words(rng, 7)
    r = oa.completions.create(model="model", prompt=prompt, max_tokens=9, temperature=0,
                              extra_body={"ignore_eos": True, "return_token_ids": True})
    text, ids, last = env["grpc"].complete(prompt, raw=True, max_new_tokens=9, temperature=0, ignore_eos=True)
    choice = r.choices[0]
    assert choice.text == text and choice.model_extra["token_ids"] == ids and len(ids) == 9
    assert choice.finish_reason == "length" and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 9 and r.usage.total_tokens == 16
    assert r.created > 0 and r.model == "model"
    # token-id prompts: exactly transformers' generate()
    p = [rng.randrange(3, EOS) for _ in range(23)]
    r = oa.completions.create(model="model", prompt=p, max_tokens=11, temperature=0,
                              extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == reference_greedy(ref_model, p, 11, ignore_eos=True)
    assert r.usage.prompt_tokens == 23 and r.usage.completion_tokens == 11


def test_concurrent_requests_each_equal_generate(env, ref_model):
    import concurrent.futures as cf
    rng = random.Random(8)
    prompts = [[rng.randrange(3, EOS) for _ in range(rng.randint(1, 40))] for _ in range(12)]

    def one(i):
        p = prompts[i]
        body = dict(model="model", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True,
                                                                                         "return_token_ids": True})
        if i % 2:   # half of them streamed
            chunks = list(env["oa"].completions.create(stream=True, **body))
            return [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])]
        return env["oa"].completions.create(**body).choices[0].model_extra["token_ids"]
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    for p, ids in zip(prompts, results):
        assert ids == reference_greedy(ref_model, p, 8, ignore_eos=True)


def test_completions_stream(env):
    oa, prompt = env["oa"], _words(random.Random(4), 5)
    full = oa.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    chunks = list(oa.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == 5
    assert len({c.id for c in chunks}) == 1


def test_batched_prompts_are_independent_requests_indexed_as_openai(env):
    """A list of prompts (strings or token ids): choice prompt_index * n + j equals that prompt's own
    request's choice j; usage counts each prompt once and sums the completions; streamed alike."""
    oa = env["oa"]
    prompts, kw = ["w5 w9 w17", "w30 w31", "w40 w41 w42 w43"], dict(model="model", max_tokens=5, temperature=1.0,
                                                                     seed=11, extra_body={"ignore_eos": True})
    r = oa.completions.create(prompt=prompts, n=2, **kw)
    singles = [oa.completions.create(prompt=p, n=2, **kw) for p in prompts]
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [c.text for s in singles for c in s.choices]
    assert r.usage.prompt_tokens == 3 + 2 + 4 and r.usage.completion_tokens == 30 and r.usage.total_tokens == 39
    ids = oa.completions.create(prompt=[[40, 41, 42, 43], [30, 31]], **kw)   # token-id prompts, n = 1
    assert [c.text for c in ids.choices] == [singles[2].choices[0].text, singles[1].choices[0].text]
    texts, usage = {}, None
    for chunk in oa.completions.create(prompt=prompts[:2], stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {k: singles[k].choices[0].text for k in range(2)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 10)


def test_continuous_usage_stats_put_usage_in_every_chunk(env):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries its choice's usage so far."""
    chunks = list(env["oa"].completions.create(
        model="model", prompt=["w5 w9 w17", "w30 w31"], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    done = {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c.choices
        assert c.usage.prompt_tokens == (3, 2)[choice.index] and c.usage.completion_tokens >= done[choice.index]
        done[choice.index] = c.usage.completion_tokens
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert done == {0: 4, 1: 4} and chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 13
    chat = list(env["oa"].chat.completions.create(
        model="model", messages=[{"role": "user", "content": "w5"}], max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chat) and chat[-2].usage.completion_tokens == 3
    plain = list(env["oa"].completions.create(model="model", prompt="w5", max_tokens=2, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1])   # without it, only the last chunk


@pytest.mark.parametrize("prompt, words", [(["w5", ""], "the prompt at index 1 must not be empty"),
                                           ([[5], []], "the prompt at index 1 must not be empty"),
                                           (["w5"] * 65, "at most 64 prompts")])
def test_batched_prompts_refused_naming_the_prompt(env, prompt, words):
    r = httpx.post(env["url"] + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and words in r.json()["error"]["message"]


def test_answers_match_the_documented_response_models(env):
    """What /openapi.json says the routes answer (router/http_gateway/responses.py, extra fields
    forbidden) is what they answer, with the optional parts (logprobs, token ids, a batch) present."""
    from router.http_gateway import responses as R
    url, ids = env["url"], {"ignore_eos": True}
    cases = [
        ("post", "/v1/completions", {"prompt": ["w5 w6", "w7"], "max_tokens": 3, "logprobs": 2, "n": 2,
                                     "return_token_ids": True, **ids}, R.CompletionResponse),
        ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 3,
                                          "logprobs": True, "top_logprobs": 2, "return_token_ids": True, **ids},
         R.ChatCompletionResponse),
        ("get", "/v1/models", None, R.ModelList), ("get", "/v1/models/model", None, R.ModelCard),
        ("post", "/tokenize", {"prompt": "w5 w6"}, R.TokenizeResponse),
        ("post", "/detokenize", {"tokens": [5, 6]}, R.DetokenizeResponse),
        ("get", "/version", None, R.VersionResponse), ("get", "/health", None, R.HealthResponse),
        ("post", "/v1/completions", {"prompt": "w5", "max_tokens": 0}, R.ErrorResponse),
    ]
    for method, path, body, model in cases:
        r = httpx.request(method, url + path, json=body, timeout=30)
        model.model_validate(r.json())


def test_chat_stream_and_not_equal_grpc(env):
    from router.http_gateway import plain_chat_prompt
    oa = env["oa"]
    messages = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13 w14"},
                {"role": "assistant", "content": "w15"}, {"role": "user", "content": [{"type": "text", "text": "w16"}]}]
    r = oa.chat.completions.create(model="model", messages=messages, max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True})
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "w16"} for m in messages]
    text, ids, last = env["grpc"].complete(plain_chat_prompt(flat), raw=True, max_new_tokens=10, temperature=0,
                                           ignore_eos=True)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == text and r.choices[0].finish_reason == "length"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (last.usage.prompt_tokens, 10)
    chunks = list(oa.chat.completions.create(model="model", messages=messages, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_stop_seed_and_eos(env):
    oa = env["oa"]
    base = oa.completions.create(model="model", prompt="w20 w21", max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
    words = base.choices[0].text.split()
    r = oa.completions.create(model="model", prompt="w20 w21", max_tokens=8, temperature=0, stop=words[2],
                              extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and words[2] not in r.choices[0].text.split()
    assert r.choices[0].text.split() == words[:2]
    a, b = (oa.completions.create(model="model", prompt="w30 w31", max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("kind, kw, field", [
    ("chat", dict(max_tokens=0), "max_tokens"),
    ("chat", dict(temperature=-1), "temperature"),
    ("chat", dict(top_p=2), "top_p"),
    ("chat", dict(n=0), "n"),                                     # n >= 1 (n > 1: several choices)
    ("chat", dict(messages=[]), "messages"),
    ("chat", dict(messages=[{"role": "wizard", "content": "w5"}]), "messages"),
    ("completions", dict(max_tokens=0), "max_tokens"),
    ("completions", dict(max_tokens=100000), "max_tokens"),        # the router's range check
    ("completions", dict(prompt="   "), "prompt"),                   # the router's empty-prompt check
    ("completions", dict(stop=[""]), "stop"),
    ("completions", dict(seed=-1), "seed"),
])
def test_bad_input_is_400(env, kind, kw, field):
    oa = env["oa"]
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            oa.chat.completions.create(**{"model": "model", "messages": [{"role": "user", "content": "w5"}], **kw})
        else:
            oa.completions.create(**{"model": "model", "prompt": "w5", **kw})
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert field in err["message"] and err["param"] == field, err


def test_malformed_json_and_unknown_paths(env):
    r = httpx.post(env["url"] + "/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(env["url"] + "/v1/completions", json=["w5"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(env["url"] + "/v1/completions", json={"prompt": "w5", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.get(env["url"] + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_auth(env):
    from router.http_gateway import start_gateway
    gw = start_gateway(env["router"].address, "127.0.0.1", 0, auth_token="s3cret", router_auth_token="")
    try:
        base = f"http://127.0.0.1:{gw.port}"
        bad = OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="model", prompt="w5", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.post(base + "/v1/chat/completions", json={}).status_code == 401   # 401 before validation
        assert httpx.get(base + "/v1/models").status_code == 401
        good = OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="model", prompt="w5", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(base + "/health").status_code == 200   # probes need no token
    finally:
        gw.stop()


def test_answered_requests_count_as_completed_never_cancelled_streamed_or_not(env):
    """Every request whose answer the client got in full is completed in the router's books: the
    gateway lets the router end each call after its last message instead of cancelling it first."""
    import concurrent.futures as cf
    oa, grpc_client = env["oa"], env["grpc"]
    wait_for(lambda: (s := grpc_client.stats()).running == 0 and s.waiting == 0, 20, what="router idle")
    before = grpc_client.stats()

    def one(i: int) -> str:
        if i % 2:
            return oa.completions.create(model="model", prompt=f"w{3 + i}", max_tokens=4, temperature=0).choices[0].text
        return "".join(c.choices[0].text for c in oa.completions.create(model="model", prompt=f"w{3 + i}", max_tokens=4,
                                                                         temperature=0, stream=True))
    with cf.ThreadPoolExecutor(24) as pool:
        assert all(isinstance(t, str) for t in pool.map(one, range(48)))
    wait_for(lambda: (s := grpc_client.stats()).running == 0 and s.waiting == 0, 20, what="router idle")
    after = grpc_client.stats()
    assert (after.completed - before.completed, after.cancelled - before.cancelled) == (48, 0)


def test_client_disconnect_cancels_the_grpc_call(env):
    grpc_client = env["grpc"]
    before = grpc_client.stats()
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", env["url"] + "/v1/completions",
                      json={"prompt": "w40 w41", "max_tokens": 1000, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert got and json.loads(got[0][6:])["choices"][0]["finish_reason"] is None
    # the connection is gone: the router must see a cancelled request and free its slot
    wait_for(lambda: grpc_client.stats().cancelled > before.cancelled, 10, what="router counted a cancel")
    wait_for(lambda: (s := grpc_client.stats()).running == 0 and s.waiting == 0, 10, what="no running request")
    after = grpc_client.stats()
    assert after.completed == before.completed and after.failed == before.failed


def test_metrics_endpoint_and_router_metrics_port(env):
    env["oa"].completions.create(model="model", prompt="w50 w51 w52", max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})
    text = httpx.get(env["url"] + "/metrics", timeout=10).text
    for name in ("baton_ttft_seconds_bucket", "baton_tpot_seconds_count", "baton_e2e_seconds_sum",
                 "baton_kv_transfer_seconds_count", "baton_requests_total{outcome=\"completed\"}",
                 "baton_kv_transfer_bytes_total", "baton_generated_tokens_total", "baton_running ",
                 "baton_waiting ", "baton_workers{role=\"decode\"} 1.0", "baton_workers{role=\"prefill\"} 1.0",
                 "baton_http_requests_total"):
        assert name in text, name
    status = env["grpc"].status()
    for w in status.workers:
        for gauge in ("baton_worker_batch_size", "baton_worker_kv_cache_bytes"):
            assert f'{gauge}{{role="{w.role}",worker_id="{w.worker_id}"}}' in text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["baton_ttft_seconds_count"] >= 1 and samples["baton_generated_tokens_total"] >= 6
    # the router process's own /metrics (python -m router --metrics-port 0)
    router_text = httpx.get(f"http://{env['metrics_addr']}/metrics", timeout=10).text
    router_samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in router_text.splitlines()
                      if line and not line.startswith("#")}
    assert router_samples["baton_ttft_seconds_count"] >= 2          # the warm-up and the requests above
    assert router_samples["baton_kv_transfer_bytes_total"] > 0
    assert router_samples['baton_requests_total{outcome="completed"}'] >= 2
    decode = [w for w in status.workers if w.role == "decode"][0]
    assert f'baton_worker_kv_cache_bytes{{role="decode",worker_id="{decode.worker_id}"}}' in router_text
    assert "request_id=" in "".join(env["router"].log) and "outcome=completed" in "".join(env["router"].log)


def test_queue_full_is_429_and_no_workers_is_503(env):
    """A router that admits nothing (--max-queue 0) and has no workers, in this process."""
    from router.http_gateway import start_gateway
    from router.main import start_router
    from router.server import RouterConfig
    server, port, _, watcher = start_router(env["model_dir"], "127.0.0.1", 0, config=RouterConfig(max_queue=0))
    gw = start_gateway(f"127.0.0.1:{port}", "127.0.0.1", 0)
    dead = start_gateway("127.0.0.1:1", "127.0.0.1", 0)
    try:
        oa = OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            oa.completions.create(model="model", prompt=[5, 6, 7], max_tokens=3)
        assert e.value.status_code == 429 and "capacity" in e.value.body["message"]
        with pytest.raises(openai.RateLimitError):
            oa.chat.completions.create(model="model", messages=[{"role": "user", "content": "w5"}], stream=True)
        assert httpx.get(f"http://127.0.0.1:{gw.port}/health").status_code == 503   # no live workers
        oa_dead = OpenAI(base_url=f"http://127.0.0.1:{dead.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            oa_dead.completions.create(model="model", prompt="w5", max_tokens=3)
        assert e.value.status_code == 503
        assert httpx.get(f"http://127.0.0.1:{dead.port}/health").status_code == 503
    finally:
        dead.stop()
        gw.stop()
        watcher.stopped.set()
        server.stop(0).wait(2)


def test_stop_is_quick_with_an_open_stream(env):
    from router.http_gateway import start_gateway
    gw = start_gateway(env["router"].address, "127.0.0.1", 0)
    assert stop_with_a_stalled_stream(gw) < 2.5
    wait_for(lambda: (s := env["grpc"].stats()).running == 0 and s.waiting == 0, 10, what="the stream's slot freed")


def test_module_entry_point(env):
    p = Proc(["router.http_gateway", "--router", env["router"].address, "--port", "0"], ready_timeout=30)
    try:
        r = httpx.get(f"http://{p.address}/health", timeout=10)
        assert r.status_code == 200
        r = httpx.post(f"http://{p.address}/v1/completions", json={"prompt": [3, 4], "max_tokens": 2}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        t0 = time.monotonic()
        assert p.stop(timeout=5) == 0 and time.monotonic() - t0 < 4
    finally:
        p.kill()


def test_chat_template_is_used_when_the_tokenizer_has_one(env):
    """Unit check of the prompt the gateway builds: with a template -> its token ids, else a plain transcript."""
    import asyncio

    from router.http_gateway import ChatMessage, Gateway
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(env["model_dir"])
    gw = Gateway("127.0.0.1:1")
    gw._tokenizer, gw._tokenizer_tried = tok, True
    msgs = [ChatMessage(role="system", content="w3"), ChatMessage(role="user", content="w4 w5")]
    assert asyncio.run(gw.chat_prompt(msgs)) == {"prompt": "system: w3\nuser: w4 w5\nassistant:", "raw": True}
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}"
    assert asyncio.run(gw.chat_prompt(msgs)) == {"prompt_token_ids": [3, 4, 5, 9]}
    gw._tokenizer = None   # no tokenizer here: one user turn goes to the router as it is (it applies its template)
    assert asyncio.run(gw.chat_prompt(msgs[1:])) == {"prompt": "w4 w5", "raw": False}
    gw._sync_channel.close()
