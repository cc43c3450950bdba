"""The benchmark's workload generator and metrics, and one tiny end-to-end run (shape, not speed)."""
import json
import math

import pytest

from deploy.bench.metrics import summarize
from deploy.bench.workload import Query, WorkloadConfig, make_workload, prompt_texts


class FakeTokenizer:
    def encode(self, text):
        return [ord(c) % 250 + 1 for c in text]


def test_workload_is_deterministic_and_mixed():
    cfg = WorkloadConfig(num_queries=400, rate_qps=4.0, seed=7)
    a, b = make_workload(cfg, FakeTokenizer()), make_workload(cfg, FakeTokenizer())
    assert a == b
    assert make_workload(WorkloadConfig(num_queries=400, seed=8), FakeTokenizer()) != a
    arrivals = [q.arrival_s for q in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert abs(arrivals[-1] / len(a) - 1 / 4.0) < 0.05       # mean gap ≈ 1 / rate
    long = [q for q in a if q.long]
    assert 0.2 < len(long) / len(a) < 0.4
    assert all(256 <= len(q.prompt_ids) <= 1024 and 32 <= q.max_new_tokens <= 256 for q in long)
    assert all(16 <= len(q.prompt_ids) <= 128 for q in a if not q.long)
    assert len(prompt_texts()) >= 30


def test_burst_and_scale():
    qs = make_workload(WorkloadConfig(num_queries=20, rate_qps=None, scale=0.25), vocab_size=100)
    assert all(q.arrival_s == 0 for q in qs)
    assert all(len(q.prompt_ids) <= 256 and all(1 <= t < 100 for t in q.prompt_ids) for q in qs)


def test_metrics_on_known_times():
    qs = [Query(0, 0.0, [1], 3), Query(1, 1.0, [1], 2)]
    times = {0: [10.5, 11.0, 11.5], 1: [12.0, 14.0]}        # start = 10
    s = summarize(qs, times, start=10.0, idle_token_fraction=0.25)
    assert s["output_tokens"] == 5 and s["num_queries"] == 2
    assert s["output_tokens_per_s"] == pytest.approx(5 / 4.0)
    assert s["ttft_p50_s"] == pytest.approx((0.5 + 1.0) / 2)   # TTFTs 0.5 and 1.0
    assert s["tpot_p99_s"] == pytest.approx(0.5 + 0.99 * (2.0 - 0.5))
    assert s["e2e_p50_s"] == pytest.approx((1.5 + 3.0) / 2)
    assert s["idle_token_fraction"] == 0.25


@pytest.mark.slow(45)
def test_tiny_end_to_end_run_writes_results(tmp_path):
    from deploy.bench.run import main
    from tiny_model import save_tiny
    model_dir = save_tiny(tmp_path / "model")
    out = tmp_path / "bench"
    assert main(["--model", model_dir, "--dtype", "float32", "--queries", "4", "--rate", "20", "--quick",
                 "--max-batch", "4", "--sweep", "10,40", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["systems"]) == {"static", "padded_prefill", "orca", "baton", "baton_grpc", "hf_static", "hf_continuous"}
    for s in res["systems"].values():
        for key in ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p99_s",
                    "idle_token_fraction"):
            assert isinstance(s[key], float) and not math.isnan(s[key]), key
        assert s["num_queries"] == 4
    assert res["systems"]["baton_grpc"]["kv_transfer_bytes"] > 0
    assert res["systems"]["padded_prefill"]["idle_token_fraction"] > 0
    assert [p["rate_qps"] for p in res["sweep"]["baton"]] == [10.0, 40.0]
    for f in ("results.md", "throughput.png", "latency_cdf.png", "throughput_vs_rate.png"):
        assert (out / f).stat().st_size > 0


def test_baton_idle_fraction_counts_the_padded_attention_columns(tiny):
    from deploy.bench.systems import BatonSystem
    system = BatonSystem(tiny, max_batch=4)
    for i, n in enumerate((3, 9)):
        system.add(Query(index=i, arrival_s=0.0, prompt_ids=list(range(1, n + 1)), max_new_tokens=4))
    while system.engine.batch.cache.num_rows < 2:   # both prefilled and embedded in the batch
        system.step()
    system.computed = system.useful = 0
    system.step()   # rows holding 3 and 9 tokens' K/V, one width of 9 columns: 6 of 18 slots are padding
    assert system.idle_fraction() == pytest.approx(1 - (3 + 9) / 18)
