"""`baton bench serve` against a fake OpenAI-compatible SSE server (no model): token counts,
TTFT / ITL from known delays, failures, concurrency cap, seeded workload and arrivals."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deploy.bench import serve
from deploy.bench.serve import ServeConfig, arrival_times, make_prompts, run_serve_bench
from deploy.bench.serve_report import markdown_table

pytestmark = pytest.mark.timeout(60)

TTFT_S, ITL_S = 0.05, 0.005
DEFAULTS = {"fail_every": 0, "usage": True, "seen": 0, "in_flight": 0, "max_in_flight": 0, "bodies": []}
state: dict = {}


def fake_app() -> FastAPI:
    """Streams max_tokens one-word chunks: the first after TTFT_S, the others ITL_S apart; every
    fail_every-th request (in arrival order) gets a 500."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def handle(req: Request, chat: bool):
        body = await req.json()
        state["seen"] += 1
        state["bodies"].append(body)
        if state["fail_every"] and state["seen"] % state["fail_every"] == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n = body["max_tokens"]

        def chunk(text):
            c = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return f"data: {json.dumps({'choices': [c]})}\n\n"

        async def events():
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:
                if chat:  # a role-only first delta: not a token, must not count as the first one
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
                for i in range(n):
                    await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
                    yield chunk(f" w{i}")
                if state["usage"] and body.get("stream_options", {}).get("include_usage"):
                    usage = {"prompt_tokens": 1000, "completion_tokens": n, "total_tokens": 1000 + n}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        return await handle(req, chat=True)
    return app


@pytest.fixture(scope="module")
def base_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(autouse=True)
def fresh_state():
    state.clear()
    state.update({k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()})


def config(base_url, **kw) -> ServeConfig:
    return ServeConfig(base_url=base_url, num_prompts=6, input_len=(8, 16), output_len=(3, 6),
                       tokenizer="none", progress=False, **kw)


def test_burst_metrics_match_the_server(base_url):
    cfg = config(base_url)
    r = run_serve_bench(cfg)
    expected = [p.output_len for p in make_prompts(cfg)]
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["config"]["model"] == "fake-model"  # taken from /v1/models
    assert [q["output_tokens"] for q in r["requests"]] == expected
    assert r["total_output_tokens"] == sum(expected)
    assert r["total_input_tokens"] == 6 * 1000  # the server's usage.prompt_tokens wins
    assert TTFT_S * 0.9 <= r["median_ttft_ms"] / 1e3 < TTFT_S + 2.0
    assert r["mean_itl_ms"] >= ITL_S * 0.5 * 1e3
    assert len([x for q in r["requests"] for x in q["itl_ms"]]) == sum(n - 1 for n in expected)
    assert r["mean_e2el_ms"] >= r["mean_ttft_ms"]
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])
    assert r["output_throughput"] == pytest.approx(sum(expected) / r["duration"])
    assert r["total_token_throughput"] == pytest.approx((6000 + sum(expected)) / r["duration"])
    body = state["bodies"][0]
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True} and isinstance(body["prompt"], str)
    json.dumps(r, allow_nan=False)  # the result is plain JSON


def test_failures_are_counted_with_their_error(base_url):
    state["fail_every"] = 3
    r = run_serve_bench(config(base_url, model="m"))
    assert (r["completed"], r["failed"]) == (4, 2)
    assert any("HTTP 500" in e and "injected failure" in e for e in r["errors"])
    assert sum(bool(q["error"]) for q in r["requests"]) == 2


def test_chat_endpoint_and_chunk_count_without_usage(base_url):
    state["usage"] = False
    cfg = config(base_url, endpoint="chat", dataset="chat", ignore_eos=False)
    r = run_serve_bench(cfg)
    prompts = make_prompts(cfg)
    assert r["completed"] == 6
    assert [q["output_tokens"] for q in r["requests"]] == [p.output_len for p in prompts]  # counted chunks
    assert r["total_input_tokens"] == sum(p.prompt_len for p in prompts)  # no usage: local count
    assert r["median_ttft_ms"] / 1e3 >= TTFT_S * 0.9  # the role-only delta is not the first token
    body = state["bodies"][0]
    assert body["messages"][0]["role"] == "user" and body["ignore_eos"] is False


def test_max_concurrency_caps_requests_in_flight(base_url):
    r = run_serve_bench(config(base_url, model="m", max_concurrency=2))
    assert r["completed"] == 6 and 1 <= state["max_in_flight"] <= 2


def test_poisson_arrivals_are_seeded_and_respected(base_url):
    assert arrival_times(5, math.inf, 0) == [0.0] * 5
    a = arrival_times(200, 10.0, 3)
    assert a == arrival_times(200, 10.0, 3) and a != arrival_times(200, 10.0, 4)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert 0.05 < (a[-1] / 199) < 0.2  # mean gap about 1/rate
    cfg = config(base_url, model="m", request_rate=20.0, seed=1)
    assert [p.text for p in make_prompts(cfg)] == [p.text for p in make_prompts(config(base_url, seed=1))]
    r = run_serve_bench(cfg)
    assert r["completed"] == 6 and r["duration"] >= arrival_times(6, 20.0, 1)[-1]
    assert [q["arrival_s"] for q in r["requests"]] == arrival_times(6, 20.0, 1)


def test_goodput_counts_requests_meeting_every_slo(base_url):
    r = run_serve_bench(config(base_url, model="m", goodput={"ttft": 60_000, "e2el": 60_000}))
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    r = run_serve_bench(config(base_url, model="m", goodput={"ttft": 60_000, "tpot": 0.001}))
    assert r["request_goodput"] == 0


def test_unreachable_server_fails_every_request():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_serve_bench(config(f"http://127.0.0.1:{port}", model="m", timeout_s=5))
    assert (r["completed"], r["failed"]) == (0, 6) and r["errors"]
    assert r["median_ttft_ms"] is None and "–" in markdown_table({"down": r})


def test_random_prompts_have_exact_token_lengths_and_a_shared_prefix_when_asked():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cfg = ServeConfig(base_url="-", num_prompts=10, input_len=(5, 30), seed=2)
    prompts = make_prompts(cfg, hf)
    assert all(5 <= p.prompt_len <= 30 and len(hf.encode(p.text, add_special_tokens=False)) == p.prompt_len
               for p in prompts)
    assert "[UNK]" not in prompts[0].text  # special tokens are never drawn
    assert [p.text for p in make_prompts(cfg, hf)] == [p.text for p in prompts]
    words = make_prompts(ServeConfig(base_url="-", num_prompts=10, input_len=(5, 30)))
    assert all(len(p.text.split()) == p.prompt_len for p in words)
    shared = make_prompts(ServeConfig(base_url="-", num_prompts=10, input_len=(5, 30), seed=2, prefix_len=12), hf)
    head = shared[0].text.split()[:12]
    assert all(p.text.split()[:12] == head and len(hf.encode(p.text, add_special_tokens=False)) == p.prompt_len
               and 17 <= p.prompt_len <= 42 for p in shared)
    assert [p.text.split()[12:] for p in shared] == [p.text.split() for p in prompts]   # the same own parts


def test_cli_writes_json_and_table(base_url, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = serve.main(["--base-url", base_url, "--num-prompts", "3", "--tokenizer", "none", "--no-progress",
                     "--input-len-min", "4", "--input-len-max", "8", "--output-len-min", "2",
                     "--output-len-max", "4", "--goodput", "ttft:60000", "--result-file", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "P99 TTFT (ms):" in printed and "Request goodput" in printed
    r = json.loads(out.read_text())
    assert r["completed"] == 3 and r["config"]["request_rate"] == "inf"
    table = markdown_table({"fake": r, "again": r})
    assert table.count("\n") == 3 and "`fake`" in table and "TTFT median ms" in table


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-prompts", "--request-rate", "--max-concurrency", "--goodput", "--ignore-eos", "--tokenizer"):
        assert flag in text
    assert "(default: 32)" in text and "(default: inf)" in text
    with pytest.raises(SystemExit):
        serve.main(["--base-url", "http://x", "--goodput", "latency:5"])
    from deploy.bench.run import main as bench_main  # `baton bench serve` routes here
    with pytest.raises(SystemExit) as e:
        bench_main(["serve", "--help"])
    assert e.value.code == 0


def test_endpoint_flops_per_token_count_every_weight_a_token_meets(tmp_path):
    from deploy.bench.endpoint import flops_per_token
    from tiny_model import save_tiny, tiny_llama
    model = tiny_llama().model
    layers = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    prefill, decode = flops_per_token(save_tiny(tmp_path / "tiny"))
    assert prefill == 2 * layers
    assert decode == 2 * (layers + model.lm_head.weight.numel())


def test_endpoint_bench_drives_a_peer_at_burst_and_a_sweep_of_rates_with_their_own_prompts_and_reports_its_matmul_ratio(base_url, tmp_path):
    import json

    from deploy.bench.endpoint import main as endpoint_main
    from tiny_model import save_tiny
    out = tmp_path / "out"
    assert endpoint_main(["--topologies", "", "--peer", f"fake={base_url}", "--model", save_tiny(tmp_path / "m"),
                          "--tokenizer", "none", "--num-prompts", "4", "--rate", "50,80", "--no-progress",
                          "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    loads = r["results"]["fake"]
    assert sorted(loads) == ["50 q/s", "80 q/s", "burst"]
    assert all(x["completed"] == 4 and x["failed"] == 0 for x in loads.values())
    assert [loads[k]["config"]["request_rate"] for k in ("50 q/s", "80 q/s")] == [50, 80]
    # each load draws its own prompts: a later one does not find an earlier one's in a server's prefix cache
    assert [loads[k]["config"]["seed"] for k in ("burst", "50 q/s", "80 q/s")] == [0, 1, 2]
    md = (out / "results.md").read_text()
    assert md.count("| `fake` |") == 6  # a row per load in each load's table and in the summary
    assert f"{r['torch_matmul_gflops']:.1f} GFLOP/s" in md


@pytest.mark.slow(25)
def test_endpoint_bench_serves_a_topology_as_plain_processes(tmp_path):
    """--launcher processes: router, workers and gateway without Ray (a GPU box that lacks it); the
    disaggregated topology, the one with the most processes."""
    import json

    from deploy.bench.endpoint import main as endpoint_main
    from tiny_model import save_tiny, save_tokenizer
    out, model = tmp_path / "out", save_tiny(tmp_path / "m")
    save_tokenizer(model)
    assert endpoint_main(["--launcher", "processes", "--topologies", "disaggregated", "--model", model,
                          "--device", "cpu", "--tokenizer", model, "--num-prompts", "3", "--rate", "50",
                          "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(results) == ["baton up (disaggregated)"]
    for loads in results.values():
        assert all(x["completed"] == 3 and x["failed"] == 0 and x["total_output_tokens"] > 0 for x in loads.values())


def test_random_model_keeps_the_config_and_tokenizer_and_draws_new_weights(tmp_path):
    import json

    from safetensors.torch import load_file

    from deploy.bench.random_model import make
    from tiny_model import save_tiny, save_tokenizer
    src = save_tiny(tmp_path / "src")
    save_tokenizer(src)
    out = make(src, str(tmp_path / "out"), seed=1)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert (out / "tokenizer.json").exists()
    a, b = load_file(f"{src}/model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not all(a[k].double().equal(b[k].double()) for k in a)
