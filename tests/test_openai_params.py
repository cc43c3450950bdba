"""The OpenAI API's contract beyond generation: every parameter that would change the output and that
baton does not honour gets 400 naming it (never silently dropped), a model name the server does not
serve gets 404 model_not_found, and /v1/models, /tokenize, /detokenize, /version and /openapi.json
answer as vLLM's do. One gateway over an in-process router with no workers: what passes the gateway's
checks reaches the router, which answers 503 (no live worker)."""
from __future__ import annotations

import importlib.metadata
import inspect

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from tiny_model import save_tokenizer
from tiny_model import save_tiny

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from router.main import start_router
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    save_tokenizer(model_dir)
    server, port, _, watcher = start_router(model_dir, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        watcher.stopped.set()
        server.stop(0).wait(2)


def _gateway(router, **kw):
    from router.http_gateway import start_gateway
    gw = start_gateway(router, "127.0.0.1", 0, **kw)
    return gw, OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def gw(router):
    gw, oa = _gateway(router)
    try:
        yield gw.url, oa
    finally:
        gw.stop()


def _create(oa: OpenAI, kind: str, **fields):
    """One request through the openai client; fields it has no argument for go in extra_body."""
    api = oa.chat.completions if kind == "chat" else oa.completions
    base = {"model": "model", **({"messages": [{"role": "user", "content": "w5"}]} if kind == "chat"
                                 else {"prompt": "w5"}), "max_tokens": 4}
    named = inspect.signature(api.create).parameters
    body = {**base, **{k: v for k, v in fields.items() if k in named}}
    extra = {k: v for k, v in fields.items() if k not in named}
    return api.create(**body, extra_body=extra or None)


REJECTED = [
    ("chat", "functions", [TOOL["function"]]), ("chat", "function_call", "auto"),
    ("chat", "stop_token_ids", [5]), ("chat", "allowed_token_ids", [5]), ("chat", "echo", True),
    ("chat", "add_generation_prompt", False), ("chat", "reasoning_effort", "high"),
    ("completions", "echo", True),
    ("completions", "suffix", "w9"), ("completions", "best_of", 2),
    ("completions", "prompt_logprobs", 1), ("completions", "use_beam_search", True),
    ("completions", "skip_special_tokens", False), ("completions", "include_stop_str_in_output", True),
]


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": [TOOL]}, "tools", "chat template renders them"),     # this model's template has no tools
    ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice", "does not force a tool call"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
])
def test_tools_this_model_cannot_take_are_400_naming_the_field(gw, fields, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        _create(gw[1], "chat", **fields)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


@pytest.mark.parametrize("kind, name, value", REJECTED, ids=[f"{k}-{n}-{v!r}"[:60] for k, n, v in REJECTED])
def test_unhonoured_parameter_is_400_naming_it(gw, kind, name, value):
    with pytest.raises(openai.BadRequestError) as e:
        _create(gw[1], kind, **{name: value})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == name and err["code"] == "unsupported_parameter", err
    assert name in err["message"] and "not supported" in err["message"], err


@pytest.mark.parametrize("kind, fields", [
    ("chat", dict(n=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tool_choice="none", tools=[],
                  logprobs=False, top_logprobs=0, response_format={"type": "text"}, user="u", store=False,
                  metadata={"k": "v"}, stream_options=None, repetition_penalty=1.0, min_tokens=0,
                  skip_special_tokens=True, add_generation_prompt=True, priority=0)),
    ("completions", dict(n=1, best_of=1, echo=False, suffix="", logprobs=None, user="u", min_tokens=0,
                         presence_penalty=0, add_special_tokens=True, min_p=0)),
])
def test_parameters_at_their_neutral_value_pass_to_the_router(gw, kind, fields):
    with pytest.raises(openai.InternalServerError) as e:   # past the gateway: the router has no worker
        _create(gw[1], kind, **fields)
    assert e.value.status_code == 503, e.value.body


HONOURED = [   # past the gateway's checks: on to the router (no worker here: 503)
    ("chat", dict(n=2, logprobs=True, top_logprobs=20, presence_penalty=2, frequency_penalty=-2, min_tokens=4,
                  repetition_penalty=1.2, logit_bias={"5": 100, "7": -100}, min_p=0.1)),
    ("completions", dict(n=16, logprobs=5, presence_penalty=0.5, frequency_penalty=0.5, min_tokens=4,
                         repetition_penalty=0.9, logit_bias={"5": -3.5})),
]


@pytest.mark.parametrize("kind, fields", HONOURED)
def test_honoured_parameters_in_range_pass_to_the_router(gw, kind, fields):
    with pytest.raises(openai.InternalServerError) as e:
        _create(gw[1], kind, **fields)
    assert e.value.status_code == 503, e.value.body


OUT_OF_RANGE = [
    ("chat", "presence_penalty", dict(presence_penalty=2.5)), ("chat", "frequency_penalty", dict(frequency_penalty=-3)),
    ("completions", "repetition_penalty", dict(repetition_penalty=0)), ("chat", "min_tokens", dict(min_tokens=5)),
    ("chat", "logit_bias", dict(logit_bias={"5": 101})), ("completions", "logit_bias", dict(logit_bias={"w": 1})),
    ("chat", "top_logprobs", dict(logprobs=True, top_logprobs=21)), ("chat", "top_logprobs", dict(top_logprobs=2)),
    ("completions", "logprobs", dict(logprobs=21)), ("completions", "min_p", dict(min_p=1.5)),
    ("chat", "min_p", dict(min_p=-0.1)), ("chat", "n", dict(n=0)), ("completions", "n", dict(n=17)),
]


@pytest.mark.parametrize("kind, param, fields", OUT_OF_RANGE, ids=[f"{k}-{f}" for k, _, f in OUT_OF_RANGE])
def test_honoured_parameter_out_of_range_is_400_naming_it(gw, kind, param, fields):
    """Checked by SamplingParams.validate (the one place) or the field's type; max_tokens is 4 here."""
    with pytest.raises(openai.BadRequestError) as e:
        _create(gw[1], kind, **fields)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param, err
    assert param in err["message"], err


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_unknown_model_is_404_model_not_found(gw, kind):
    with pytest.raises(openai.NotFoundError) as e:
        _create(gw[1], kind, model="gpt-4o")
    err = e.value.body
    assert e.value.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", err
    assert "gpt-4o" in err["message"] and "model" in err["message"]
    r = httpx.post(gw[0] + "/tokenize", json={"model": "gpt-4o", "prompt": "w5"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_models_list_max_model_len(gw):
    (card,) = gw[1].models.list().data
    assert card.id == "model" and card.model_extra["max_model_len"] == 1024   # the tiny model's context


def test_served_model_name_is_listed_and_the_only_name_accepted(router):
    gw, oa = _gateway(router, model_name="tiny-llama")
    try:
        assert [m.id for m in oa.models.list().data] == ["tiny-llama"]
        assert oa.models.retrieve("tiny-llama").model_extra["max_model_len"] == 1024
        with pytest.raises(openai.NotFoundError):
            _create(oa, "completions", model="model")
        with pytest.raises(openai.InternalServerError):   # accepted: on to the router (no worker: 503)
            _create(oa, "completions", model="tiny-llama")
    finally:
        gw.stop()


def test_served_model_name_flag_on_gateway_and_baton_up():
    from deploy.cli import build_parser
    from router.http_gateway.server import build_parser as gateway_parser
    for argv in (["--served-model-name", "m1"], ["--model-name", "m1"]):
        assert gateway_parser().parse_args(argv).served_model_name == "m1"
        assert build_parser().parse_args(["up", *argv]).served_model_name == "m1"


def test_tokenize_round_trips_through_detokenize(gw):
    url = gw[0]
    r = httpx.post(url + "/tokenize", json={"model": "model", "prompt": "w5 w6 w77"}, timeout=30).json()
    assert r == {"count": 3, "max_model_len": 1024, "tokens": [5, 6, 77], "token_strs": None}
    back = httpx.post(url + "/detokenize", json={"model": "model", "tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": "w5 w6 w77"}
    # a conversation is counted as /v1/chat/completions sends it (no template here: the plain transcript)
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "w5"}]}, timeout=30).json()
    assert chat["tokens"] == [2, 5, 2] and chat["count"] == 3   # "user: w5\nassistant:"; 2 = <unk>
    bad = httpx.post(url + "/detokenize", json={"tokens": [5, 100000]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    neither = httpx.post(url + "/tokenize", json={}, timeout=30)
    assert neither.status_code == 400 and "prompt or messages" in neither.json()["error"]["message"]


def test_version_is_batons(gw):
    r = httpx.get(gw[0] + "/version", timeout=30)
    assert r.status_code == 200 and r.json() == {"version": importlib.metadata.version("baton")}


def test_openapi_documents_the_request_bodies(gw):
    doc = httpx.get(gw[0] + "/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    for path, name, field in (("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                              ("/v1/completions", "CompletionRequest", "prompt"),
                              ("/tokenize", "TokenizeRequest", "prompt"),
                              ("/detokenize", "DetokenizeRequest", "tokens")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert field in schemas[name]["properties"]
    refs = {v for v in _values(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert refs and all(r.rsplit("/", 1)[1] in schemas for r in refs)   # every reference resolves
    assert doc["info"]["version"] == importlib.metadata.version("baton") and "/version" in doc["paths"]


@pytest.mark.parametrize("path, method, name", [
    ("/v1/completions", "post", "CompletionResponse"), ("/v1/chat/completions", "post", "ChatCompletionResponse"),
    ("/v1/models", "get", "ModelList"), ("/v1/models/{model_id}", "get", "ModelCard"),
    ("/tokenize", "post", "TokenizeResponse"), ("/detokenize", "post", "DetokenizeResponse"),
    ("/version", "get", "VersionResponse"), ("/health", "get", "HealthResponse")])
def test_openapi_documents_the_responses(gw, path, method, name):
    doc = httpx.get(gw[0] + "/openapi.json", timeout=30).json()
    responses = doc["paths"][path][method]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert doc["components"]["schemas"][name]["properties"]
    if path.startswith("/v1/"):   # errors documented as OpenAI's error object
        assert responses["404" if "{" in path else "401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}


def test_docs_page_loads_nothing_from_outside(gw):
    """/docs is Swagger UI from the gateway's own files: no URL on the page leaves the server, and
    every file it loads is served (offline, it is not blank); /redoc (a CDN page) is off."""
    import re
    page = httpx.get(gw[0] + "/docs", timeout=30)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r'(?:src|href)="([^"]+)"|url: *\'([^\']+)\'', page.text)
    urls = [a or b for a, b in urls]
    assert urls and not [u for u in urls if "//" in u], urls
    for u in urls:
        r = httpx.get(gw[0] + u, timeout=30)
        assert r.status_code == 200 and len(r.content) > 100, (u, r.status_code)
    assert httpx.get(gw[0] + "/docs/static/swagger-ui.js.map", timeout=30).status_code == 404   # only those
    assert httpx.get(gw[0] + "/redoc", timeout=30).status_code == 404


def _values(o):
    if isinstance(o, dict):
        for v in o.values():
            yield from _values(v)
    elif isinstance(o, list):
        for v in o:
            yield from _values(v)
    else:
        yield o
