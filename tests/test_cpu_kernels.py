"""baton's CPU kernels (baton/engine/kernels/): the same numbers as torch's ops, and a row's numbers
do not depend on its batch-mates, bit for bit, in float32 too; the CPU step runs on them."""
import random

import pytest
import torch
import torch.nn.functional as F

from baton.engine.cache import BatchKVCache
from baton.engine.cpu_layers import CpuLayers
from baton.engine.decode_graphs import DecodeGraphs
from baton.engine.gguf_weights import Q4_1, Q8_0, QuantRows, _matched
from baton.engine.kernels import cpu_kernels
from baton.engine.linear import Linear, max_rows
from baton.engine.pointwise import KernelPointwise, TorchPointwise
from baton.engine.runner import ModelRunner, PromptChunk
from tiny_model import EOS, tiny_family, tiny_llama


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels()
    assert k is not None, "baton's CPU kernels were not built (make install builds them; see the log's warning)"
    return k


def test_the_cpu_step_runs_on_batons_kernels(tiny, kernels):
    runner = ModelRunner(tiny.model)
    assert runner.uses_cpu_kernels
    assert all(lin.packed for L in runner.linears for lin in L) and runner.lm_head.packed
    assert "baton's CPU kernels" in runner.describe()


def kernel_rows(kernels) -> int:
    """Every row count the kernel runs, up to more than two of its passes over the weights (256 rows each)."""
    return max_rows(kernels) or 600


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_equals_torch_for_every_shape(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=0, atol=1e-11) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for N, K in [(1, 1), (17, 5), (33, 300), (100, 520), (64, 64)]:   # panels and k blocks cut mid-way
        w, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
        lin, biased = Linear(w), Linear(w, b)
        for M in (1, 2, 13, 25, kernel_rows(kernels)):
            x = torch.randn(M, 2 * K, generator=g, dtype=dtype)[:, ::2]            # not contiguous
            torch.testing.assert_close(lin(x), F.linear(x, w), **tol)
            torch.testing.assert_close(biased(x), F.linear(x, w, b), **tol)
        x3 = torch.randn(2, 3, K, generator=g, dtype=dtype)
        assert biased(x3).shape == (2, 3, N)
        torch.testing.assert_close(biased(x3), F.linear(x3, w, b), **tol)


def test_linear_rows_do_not_depend_on_their_batch_mates(kernels):
    g = torch.Generator().manual_seed(1)
    lin = Linear(torch.randn(200, 576, generator=g))
    x = torch.randn(kernel_rows(kernels), 576, generator=g)
    full = lin(x)
    for n in (n for n in (1, 2, 7, 12, 13, 31, 255, 256, 257, 300) if n < len(x)):
        assert torch.equal(lin(x[:n]), full[:n])
        assert torch.equal(lin(x[n:n + 1])[0], full[n])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointwise_kernels_equal_torchs_ops(kernels, dtype):
    """RMSNorm (with and without the residual add), SiLU-and-mul and RoPE by the kernels equal torch's
    as the runner calls them, SiLU far into both tails too (RMSNorm is computed in float32 whatever
    the dtype, as HF's)."""
    g = torch.Generator().manual_seed(3)
    ref, ours = TorchPointwise(1e-5), KernelPointwise(1e-5, kernels)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=2e-6, atol=2e-6)
    h, delta, w = (torch.randn(*s, generator=g, dtype=dtype) for s in ((7, 579), (7, 579), (579,)))
    torch.testing.assert_close(ours.rms_norm(h, w), ref.rms_norm(h, w), **tol)
    h1, h2 = h.clone(), h.clone()
    torch.testing.assert_close(ours.add_rms_norm(h1, delta, w), ref.add_rms_norm(h2, delta, w), **tol)
    torch.testing.assert_close(h1, h2, **tol)                                       # the residual, in place
    gate_up = torch.randn(5, 2 * 77, generator=g, dtype=dtype) * 4
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -20.0, 20.0, 90.0, 200.0], dtype=dtype)
    torch.testing.assert_close(ours.silu_mul(gate_up), ref.silu_mul(gate_up), **tol)
    qkv = torch.randn(6, 8 * 64, generator=g, dtype=dtype)
    qk = qkv[:, :5 * 64].unflatten(-1, (5, 64))                                      # a strided view, as in qkv()
    cos, sin = (torch.randn(6, 1, 64, generator=g, dtype=dtype) for _ in range(2))
    expected = ref.rope(qk, cos, sin)
    assert ours.rope(qk, cos, sin).data_ptr() == qkv.data_ptr()                      # rotated in place
    torch.testing.assert_close(qk, expected, **tol)


def _random_rows(kind: str, N: int, K: int, g: torch.Generator) -> QuantRows:
    """GGUF's blocks: d and m are float16 values (so d * q is exact in float32, as the kernel relies on)."""
    d = (torch.rand(N, K // 32, generator=g) * 0.01).half().float()
    if kind == Q4_1:
        return QuantRows(kind, torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8), d,
                         (torch.rand(N, K // 32, generator=g) - 0.5).half().float())
    return QuantRows(kind, torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), d, None)


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_a_linear_over_gguf_blocks_gives_the_float32_weights_bits(kernels, kind):
    """Kept as GGUF blocks and widened as a step meets them (in registers up to a row block: 1, 3 and,
    with AVX-512, 12 rows; through a panel block beyond), a weight gives exactly what its float32
    widening gives through the float32 kernel (every row count, panels cut mid-way)."""
    g = torch.Generator().manual_seed(4)
    for N, K in [(33, 64), (100, 576), (17, 1536)]:
        rows = _random_rows(kind, N, K, g)
        weight = rows.widened()
        quantized, widened = Linear(weight, quant=rows), Linear(weight)
        assert quantized.quantized and quantized.packed_bytes < widened.packed_bytes / 2
        for M in (1, 3, 12, 13, 40):
            x = torch.randn(M, K, generator=g)
            assert torch.equal(quantized(x), widened(x)), (N, K, M)


def test_gguf_rows_are_matched_to_the_loaded_weight_bit_for_bit():
    """Rows are found wherever the converter moved them; a weight with one value off is not matched."""
    g = torch.Generator().manual_seed(5)
    rows = _random_rows(Q4_1, 48, 64, g)
    order = torch.randperm(48, generator=g)
    weight = rows.widened()[order]                     # Q/K's rows come permuted from the converter
    found = _matched(rows, weight)
    assert found is not None and torch.equal(found.widened(), weight)
    weight[7, 3] += 1e-3
    assert _matched(rows, weight) is None


def _masked_sdpa(q, keys, values, lens, scale):
    T = keys.shape[2]
    hidden = torch.arange(T)[None] < (T - lens)[:, None]
    mask = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None], scale=scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G", [3, 6])     # query heads per K/V head: 6 weighs V in two blocks (4 + 2)
def test_decode_attention_reads_only_each_rows_own_columns(kernels, dtype, G):
    """Equal to torch's SDPA under the step's mask; what a row does not own (NaN here) is never read,
    and a row gives the same bits alone as in the batch."""
    g = torch.Generator().manual_seed(2)
    n, H, D, cols, start, T = 6, 2, 64, 300, 40, 211
    buf = torch.randn(2, n, H, cols, D, generator=g, dtype=dtype)
    keys, values = buf[0, :, :, start:start + T], buf[1, :, :, start:start + T]      # strided, as the cache's views
    lens = torch.tensor([T, 1, 2, 17, 150, 64])
    q = torch.randn(n, H, G, D, generator=g, dtype=dtype)
    expected = _masked_sdpa(q, keys, values, lens, D ** -0.5)
    for r, length in enumerate(lens.tolist()):
        buf[:, r, :, start:start + T - length] = float("nan")                     # columns row r does not own
    out = kernels.decode_attention(q, keys, values, lens, D ** -0.5)
    tol = dict(rtol=0, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, **tol)
    for r in range(n):
        assert torch.equal(kernels.decode_attention(q[r:r + 1], keys[r:r + 1], values[r:r + 1], lens[r:r + 1],
                                                    D ** -0.5)[0], out[r])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G", [1, 3, 4])   # query heads per K/V head
def test_prompt_attention_is_causal_sdpa_and_a_tokens_bits_do_not_depend_on_the_chunking(kernels, dtype, G):
    """Equal to torch's causal SDPA over the prompt's buffer; positions past the chunk (NaN here) are never
    read; a token's output is the same bits whether its prompt comes in one chunk or in several."""
    g = torch.Generator().manual_seed(3)
    H, D, P = 2, 2 * kernels.vector_bytes() // dtype.itemsize, 150
    kv = torch.randn(2, H, P + 20, D, generator=g, dtype=dtype)
    kv[:, :, P:] = float("nan")                                        # past the prompt: never read
    qk = torch.randn(P, H * G + H, D, generator=g, dtype=dtype)       # q's heads, then k's: the runner's view
    q = qk[:, :H * G]
    whole = kernels.prompt_attention(q, kv[0], kv[1], 0, D ** -0.5)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kv[0, None, :, :P], kv[1, None, :, :P],
                                              is_causal=True, scale=D ** -0.5, enable_gqa=G > 1)
    tol = dict(rtol=0, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, expected[0].transpose(0, 1).flatten(1), **tol)
    for cuts in ([1, 2, 70], [64], [149]):
        bounds = [0, *cuts, P]
        for a, b in zip(bounds, bounds[1:]):
            part = kernels.prompt_attention(q[a:b], kv[0, :, :b], kv[1, :, :b], a, D ** -0.5)
            assert torch.equal(part, whole[a:b]), (cuts, a)


def test_kernels_give_the_same_bits_on_any_number_of_threads(kernels):
    """Work is handed out to threads as they come free (kernels/share.h): which thread computes an item,
    and how many threads share them (more than the cores, so some items are taken from another's share),
    never changes a number."""
    g = torch.Generator().manual_seed(9)
    lin = Linear(torch.randn(300, 96, generator=g))
    x = torch.randn(40, 96, generator=g)
    q, kv = torch.randn(5, 2, 3, 32, generator=g), torch.randn(2, 5, 2, 70, 32, generator=g)
    lens = torch.tensor([70, 1, 33, 64, 9])

    def run():
        return lin(x), lin(x[:3]), kernels.decode_attention(q, kv[0], kv[1], lens, 0.2)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run()
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            assert all(torch.equal(a, b) for a, b in zip(run(), alone)), n
    finally:
        torch.set_num_threads(threads)


def test_decode_attention_refuses_a_length_outside_the_window(kernels):
    q, kv = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="outside the window"):
        kernels.decode_attention(q, kv, kv, torch.tensor([9]), 0.25)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_argmax_rows_picks_what_torch_argmax_picks_ties_nan_and_inf_included(kernels, dtype):
    """Greedy sampling's choice: the first index of a row's maximum, a NaN above all (its first one),
    an all -inf row 0; rows shorter than a vector, and tails after the last full vector."""
    gen = torch.Generator().manual_seed(0)
    for V in (1, 5, 16, 17, 40, 1003):
        x = torch.randn(6, V, dtype=dtype, generator=gen)
        x[1] = x[1].round()                                        # ties, the first must win
        x[2] = x[2].max()                                          # all equal: index 0
        x[3] = float("-inf")
        x[4, V // 2] = float("nan")
        x[4, V - 1] = float("nan")
        x[5, V - 1] = x[5].max() + 1                               # the maximum in the tail
        assert torch.equal(kernels.argmax_rows(x), torch.argmax(x, dim=-1)), V


def test_a_float32_rows_logits_are_the_same_bits_alone_and_in_any_batch(kernels):
    """The whole CPU decode step, float32: a row's logits alone equal its logits among longer and
    shorter batch-mates (its padding differs), bit for bit."""
    model = tiny_llama(dtype=torch.float32)
    runner = ModelRunner(model.model)
    graphs = DecodeGraphs(runner, max_rows=8)
    rng = random.Random(5)
    prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (23, 90, 4, 51, 23)]
    kvs = []
    for p in prompts:
        chunk = PromptChunk(p, 0, runner.new_kv(len(p)))
        runner.forward([], None, [chunk])
        kvs.append(chunk.kv)

    def step_logits(rows: list[int]) -> torch.Tensor:
        cache = BatchKVCache(runner.num_layers, runner.num_kv_heads, runner.head_dim, dtype=torch.float32,
                             max_rows=8, max_cols=256)
        for i in rows:
            cache.join(f"r{i}", None, kvs[i])
        out = []
        for t in (7, 11, 13):                          # three steps: every row's own column grows
            out.append(graphs.step([t + i for i in rows], cache).clone())
        return torch.stack(out, 1)                     # (rows, steps, V)

    alone = step_logits([0])[0]
    for rows in ([1, 0, 2], [2, 3, 0, 4, 1], [0, 4]):
        assert torch.equal(step_logits(rows)[rows.index(0)], alone), rows


@pytest.mark.parametrize("family", ["llama", "qwen2"])     # qwen2: Q/K/V biases
def test_the_cpu_layer_loop_gives_the_layer_methods_bits(kernels, family):
    """A CPU decode step's layers in one kernel call (cpu_layers.py) against the same step through the
    runner's layer methods piece by piece (DecodeGraphs padded to buckets runs those): the same logits
    and the same K/V in the cache, bit for bit, over steps of a ragged batch."""
    runner = ModelRunner(tiny_family(family).model.float())
    rng = random.Random(8)
    kvs = []
    for n in (23, 60, 5):
        chunk = PromptChunk([rng.randrange(1, EOS) for _ in range(n)], 0, runner.new_kv(n))
        runner.forward([], None, [chunk])
        kvs.append(chunk.kv)

    def steps(graphs: DecodeGraphs):
        cache = BatchKVCache(runner.num_layers, runner.num_kv_heads, runner.head_dim, dtype=torch.float32,
                             max_rows=4, max_cols=128)
        for i, kv in enumerate(kvs):
            cache.join(f"r{i}", None, kv)
        logits = [graphs.step([t, t + 1, t + 2], cache).clone() for t in (7, 11, 13)]
        return torch.stack(logits), cache.buf.clone()

    loop, pieces = DecodeGraphs(runner, max_rows=4), DecodeGraphs(runner, max_rows=4, buckets=[3])
    assert loop.layers is not None and pieces.layers is None
    (a, kv_a), (b, kv_b) = steps(loop), steps(pieces)
    assert torch.equal(a, b) and torch.equal(kv_a, kv_b)


def test_the_cpu_layer_loop_stays_out_where_a_step_is_not_all_batons_kernels(kernels):
    """float64 (RMSNorm on torch's ops) and per-head q/k norms (qwen3) run the layer methods instead."""
    assert CpuLayers.of(ModelRunner(tiny_family("qwen3").model.float()), 8) is None
    assert CpuLayers.of(ModelRunner(tiny_llama(dtype=torch.float64).model), 8) is None
    assert CpuLayers.of(ModelRunner(tiny_llama(dtype=torch.float32).model), 8) is not None


def test_a_float32_prompts_logits_and_kv_are_the_same_bits_alone_and_beside_other_prompts(kernels):
    """Chunked prefill, float32: a prompt's first-token logits and K/V alone equal what it gets sharing
    a step with other prompts (hundreds of tokens: more than one pass of the linear kernel), bit for bit.
    Wider than the tiny Llama: at its width MKL's sums happen to come out the same whatever the rows."""
    if max_rows(kernels) is not None:
        pytest.skip(f"float32 weights: steps over {max_rows(kernels)} rows run MKL on this machine")
    runner = ModelRunner(tiny_family("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=1)
                         .model.float())
    rng = random.Random(6)
    prompts = [[rng.randrange(1, EOS) for _ in range(n)] for n in (37, 250, 120, 9)]

    def prefill(order: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        chunks = [PromptChunk(prompts[i], 0, runner.new_kv(len(prompts[i]))) for i in order]
        _, logits = runner.forward([], None, chunks)
        return {i: (lg, c.kv) for i, lg, c in zip(order, logits, chunks)}

    alone = prefill([0])[0]
    for order in ([1, 0], [2, 3, 0, 1], [0, 2]):
        logits, kv = prefill(order)[0]
        assert torch.equal(logits, alone[0]) and torch.equal(kv, alone[1]), order
