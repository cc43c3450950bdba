"""Every supported architecture (baton/engine/models/) gives generate()'s greedy tokens exactly, in a
batch where rows join and leave (tiny random models, float64); others are refused by name."""
import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import Engine
from baton.engine.models import REGISTRY
from baton.engine.runner import ModelRunner
from baton.sampling import SamplingParams
from tiny_model import EOS, reference_greedy, tiny_family


@pytest.mark.parametrize("model_type, config", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}), ("qwen2", {}),
    ("qwen3", {})])   # qwen3 with attention_bias: biases on Q, K, V and O
def test_family_equals_generate(model_type, config):
    model = tiny_family(model_type, **config)
    rng = random.Random(5)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    lengths = [rng.randint(1, 12) for _ in prompts]
    # 3 rows for 5 queries: later ones join as earlier ones leave; 16-token chunks split the prompts
    eng = Engine(model, EngineConfig(max_batch=3, prefill_chunk_tokens=16, prefix_cache_mb=0))
    done = eng.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths])
    for r, p, n in zip(done, prompts, lengths):
        assert r.output_ids == reference_greedy(model, p, n, ignore_eos=True), (model_type, r.request_id)


def test_registry_names_every_family():
    assert set(REGISTRY) == {"llama", "mistral", "qwen2", "qwen3"}


def test_unsupported_type_is_refused_by_name(tiny):
    class Other(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "gpt2"})()
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        ModelRunner(Other())


@pytest.mark.parametrize("model_type, config", [
    ("mistral", {"sliding_window": 48}), ("qwen2", {"sliding_window": 48, "use_sliding_window": True,
                                                   "max_window_layers": 0})])
def test_a_sliding_window_caps_the_context_so_rows_stay_exact(model_type, config):
    """HF masks attention beyond the window; no row outgrows it here, so the whole-context attention
    baton computes is the windowed one, to the window's last token."""
    model = tiny_family(model_type, **config)
    eng = Engine(model, EngineConfig(max_batch=2, prefix_cache_mb=0))
    assert eng.max_len == 48 and tiny_family("qwen2", sliding_window=48).max_len == 1024   # window not in use
    rng = random.Random(9)
    prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (30, 40)]
    done = eng.generate(prompts, SamplingParams(max_new_tokens=100, ignore_eos=True))
    for r, p in zip(done, prompts):
        assert len(p) + len(r.output_ids) == 48
        assert r.output_ids == reference_greedy(model, p, 48 - len(p), ignore_eos=True)
