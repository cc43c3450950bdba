"""The only module that runs the model: one pass over the weights for a decode step of the
batch and prompt chunks of newcomers.

At load the Hugging Face weights are regrouped for fewer, larger matmuls: Q/K/V into one
projection and gate/up into one (baton/engine/models/layer.py: the HF modules' weights become views of
the fused tensors, so the fusion stores nothing twice and `generate()` still runs on the same numbers). The layer
itself is plain tensor code over a flat token axis (no module wrappers): per-op overhead is
what dominated small steps (profiled, docs/benchmarks.md). Attention is ours, because the
batch's K/V lives in BATON's shared cache (see cache.py). On a CPU the products (linear.py), the
decode attention (`decode_attention_for`) and the small ops (pointwise.py) run baton's own kernels
(kernels/); elsewhere torch's.
The supported architectures and how each one's layer weights are read: baton/engine/models/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from baton.engine import gguf_weights
from baton.engine.cache import BatchKVCache, StepInputs
from baton.engine.kernels import cpu_kernels, cpu_kernels_for
from baton.engine.linear import LayerLinears, Linear
from baton.engine.models import layer_reader
from baton.engine.pointwise import KernelPointwise, pointwise_for


@dataclass
class PromptChunk:
    """Tokens [start, start + len(ids)) of one prompt, prefilled on their own.

    Their K/V is written into `kv` (L, 2, Hkv, P, D), the prompt's own buffer, and they
    attend causally over kv[..., :start + len(ids)]: a long prompt is prefilled over several
    steps (chunked prefill), each chunk seeing the ones before it."""
    ids: list[int]
    start: int
    kv: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    @property
    def last(self) -> bool:
        """Whether this chunk completes the prompt (only then are its logits wanted)."""
        return self.end == self.kv.shape[3]


class ModelRunner:
    def __init__(self, hf_model: torch.nn.Module, gguf: Path | None = None):
        """`gguf`: the GGUF file the weights were widened from (LoadedModel.gguf): on a CPU in float32 the
        kernels read its quantized blocks instead (the same values; baton/engine/gguf_weights.py)."""
        cfg = hf_model.config
        read_layer = layer_reader(cfg.model_type)       # ValueError naming the supported types
        self.hf = hf_model.eval().requires_grad_(False)
        body = hf_model.model
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.dtype = next(hf_model.parameters()).dtype
        self.device = next(hf_model.parameters()).device
        self.embed_weight = body.embed_tokens.weight       # (V, hidden)
        self.norm_weight = body.norm.weight
        self.lm_head_weight = hf_model.lm_head.weight       # tied to embed_weight in SmolLM2
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = body.rotary_emb(probe, position_ids=torch.arange(self.max_positions, device=self.device)[None])
        half = self.head_dim // 2   # rotate_half's sign folded into sin: x*cos + roll(x)*sin, exactly HF's values
        self._cos, self._sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)   # (positions, D)
        self.layers = [read_layer(layer) for layer in body.layers]   # Q/K/V and gate/up fused
        quant, head = [None] * self.num_layers, None
        if gguf is not None and self.dtype == torch.float32 and cpu_kernels_for(self.device, self.dtype):
            quant, head = gguf_weights.read(hf_model, gguf)
        self.linears = [LayerLinears.of(L, q) for L, q in zip(self.layers, quant)]
        self.lm_head = Linear(self.lm_head_weight, quant=head)
        self._attention = decode_attention_for(self.device, self.dtype, self.head_dim)
        self._prompt_attention = prompt_attention_for(self.device, self.dtype, self.head_dim)
        self.pointwise = pointwise_for(self.device, self.dtype, self.eps)
        # baton's own CPU kernels run the step (all of them, or none: they come from one build)
        self.uses_cpu_kernels = self.lm_head.packed and isinstance(self.pointwise, KernelPointwise)

    def describe(self) -> str:
        """How the step computes, for the start-up log."""
        if self.uses_cpu_kernels:
            linears = [lin for L in self.linears for lin in L] + [self.lm_head]
            packed = sum(lin.packed_bytes for lin in linears)
            gguf = sum(lin.quantized for lin in linears)
            return (f"step on baton's CPU kernels ({8 * cpu_kernels().vector_bytes()}-bit vectors; packed weights "
                    f"{packed / 2 ** 20:.0f} MiB{f', {gguf} of {len(linears)} as GGUF blocks' if gguf else ''})")
        return "step on torch's CPU ops" if self.device.type == "cpu" else f"step on torch's {self.device.type} ops"

    # ---- layer primitives (public: the benchmark's baselines build their schemes from them) ----
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> hidden states (..., hidden)."""
        return F.embedding(ids, self.embed_weight)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (...,) -> cos, signed sin (..., 1, D), to broadcast over heads: a gather from tables the
        model's own rotary module computed once for its whole context (so the values equal what
        `generate()` uses, and a step never reads a position back to the host). The sin's first half
        is negated: what `pointwise.rope` takes."""
        return self._cos[pos].unsqueeze(-2), self._sin[pos].unsqueeze(-2)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as HF computes it (baton/engine/pointwise.py)."""
        return self.pointwise.rms_norm(x, weight)

    def qkv(self, li: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """h (..., hidden) -> q (..., Hq, D), k and v (..., Hkv, D); q and k rotated."""
        L = self.layers[li]
        x = self.linears[li].qkv(self.norm(h, L.in_norm))                          # (..., (Hq + 2 Hkv) * D)
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qk = x[..., :(Hq + Hkv) * D].unflatten(-1, (Hq + Hkv, D))                # q's heads, then k's
        v = x[..., (Hq + Hkv) * D:].unflatten(-1, (Hkv, D))
        if L.q_norm is not None:  # a family with per-head q/k norms (qwen3): before RoPE
            qk = torch.cat((self.norm(qk[..., :Hq, :], L.q_norm), self.norm(qk[..., Hq:, :], L.k_norm)), dim=-2)
        qk = self.pointwise.rope(qk, *rope)                                       # q and k in one pass
        return qk[..., :Hq, :], qk[..., Hq:, :], v

    def attn_out_mlp(self, li: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of a layer: h += o_proj(attn), then h += MLP(norm(h)), in place; returns h. attn (..., Hq*D)."""
        L, P, ops = self.layers[li], self.linears[li], self.pointwise
        normed = ops.add_rms_norm(h, P.o(attn), L.post_norm)
        return h.add_(P.down(ops.silu_mul(P.gate_up(normed))))

    def batch_attention(self, li: int, cache: BatchKVCache, step: StepInputs, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The batch's rows at layer li: their new k, v (n, Hkv, D) written into the step's column of
        the cache's views, their queries q (n, Hq, D) over their own tokens (the step's mask)
        -> (n, Hq * D)."""
        keys, values = cache.layer_views(li)                               # (n, Hkv, T, D) views
        keys[:, :, step.col] = k
        values[:, :, step.col] = v
        # GQA without repeating K/V: the group's query heads act as query positions.
        qd = q.unflatten(1, (self.num_kv_heads, self.group))               # (n, Hkv, G, D)
        return self._attention(qd, keys, values, step, self.scale).flatten(1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., hidden) -> (..., V)."""
        return self.lm_head(self.norm(h, self.norm_weight))

    # ---- the step ------------------------------------------------------------------------------
    def new_kv(self, num_tokens: int) -> torch.Tensor:
        """A prompt's own K/V buffer (L, 2, Hkv, P, D)."""
        return torch.empty(self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim,
                           dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, tokens: list[int], cache: BatchKVCache | None, chunks: list[PromptChunk]):
        """One pass over the weights for a decode step of the batch and prompt chunks.

        Projections and MLP run on all tokens together, as one flat axis; attention does not
        mix them: the batch's rows attend over the shared cache (their new K/V written into its
        next column, no copy of the rest), each chunk attends causally over its own prompt.
        Returns decode logits (n, V) and the logits (V,) of every chunk that completes its prompt
        (None for the others)."""
        n, lens = len(tokens), [len(c.ids) for c in chunks]
        dev = self.device
        ids = torch.tensor(list(tokens) + [t for c in chunks for t in c.ids], dtype=torch.long, device=dev)  # (M,)
        step = cache.begin_step() if n else None                           # the rows' positions, column, mask
        pos = torch.cat(([step.positions] if n else [])
                        + [torch.arange(c.start, c.end, device=dev) for c in chunks])                        # (M,)
        offsets = [n + sum(lens[:j]) for j in range(len(chunks))]
        rope = self.rope(pos)
        h = self.embed(ids)                                                # (M, hidden)
        attn = torch.empty(len(ids), self.num_heads * self.head_dim, dtype=self.dtype, device=dev)
        for li in range(self.num_layers):
            q, k, v = self.qkv(li, h, rope)                                # (M, H, D)
            if n:
                attn[:n] = self.batch_attention(li, cache, step, q[:n], k[:n], v[:n])
            for c, a, m in zip(chunks, offsets, lens):
                kv = c.kv[li]                                              # (2, Hkv, P, D)
                kv[0, :, c.start:c.end] = k[a:a + m].transpose(0, 1)
                kv[1, :, c.start:c.end] = v[a:a + m].transpose(0, 1)
                attn[a:a + m] = self._prompt_attention(q[a:a + m], kv[0], kv[1], c.start, self.scale)  # (m, Hq * D)
            h = self.attn_out_mlp(li, h, attn)
        if n:
            cache.end_step()
        wanted = list(range(n)) + [a + m - 1 for c, a, m in zip(chunks, offsets, lens) if c.last]
        logits = self.logits(h[wanted])                                    # (n + completed chunks, V)
        done = iter(logits[n:])
        return logits[:n], [next(done) if c.last else None for c in chunks]


def prompt_attention_for(device: torch.device, dtype: torch.dtype, head_dim: int):
    """How a prompt chunk attends: q (m, Hq, D) of prompt positions start .. start + m - 1, each over
    keys/values (Hkv, P, D) (the prompt's own buffer, written through its position) up to its own
    position -> (m, Hq * D).

    On a CPU (float32/64), baton's kernel (kernels/attention.cpp `prompt_attention`) on the product
    micro-kernel; 30 SmolLM2 layers of 16 prompts of 128 tokens: 148 ms against 279 for torch's CPU flash
    SDPA (2 Zen 2 threads, 2026-12-06). Elsewhere torch's SDPA, causal, with a mask when the chunk does
    not start the prompt (flash on CUDA)."""
    kernels = cpu_kernels_for(device, dtype)
    if kernels is not None and head_dim % (2 * kernels.vector_bytes() // dtype.itemsize) == 0:   # whole panels
        return kernels.prompt_attention

    def sdpa(q, keys, values, start: int, scale: float) -> torch.Tensor:
        m, end = q.shape[0], start + q.shape[0]
        # token i sees prompt positions <= start + i: a plain causal mask when the chunk starts the prompt
        mask = None if start == 0 else torch.ones(m, end, dtype=torch.bool, device=q.device).tril(start)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None, :, :end], values[None, :, :end],
                                           attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=keys.shape[0] != q.shape[1])
        return o[0].transpose(0, 1).flatten(1)
    return sdpa


def decode_attention_for(device: torch.device, dtype: torch.dtype, head_dim: int):
    """How a decode step attends: q (n, Hkv, G, D) over keys/values (n, Hkv, T, D) strided views of the
    batch cache, the group's query heads as query positions (GQA without repeating K/V) -> (n, Hkv, G, D).

    On a CPU (float32/64), baton's kernel (baton/engine/kernels/attention.cpp): each row over its own
    `step.lengths` columns only, not the batch's padded width; 30 SmolLM2 layers at 32 rows of 110-200
    tokens: 13.5 ms against 27-28 for torch's CPU flash SDPA with the mask (2 threads, AVX-512; 2026-12-05).
    Elsewhere torch's SDPA with the step's additive mask (flash on CUDA), reading the views in place."""
    kernels = cpu_kernels_for(device, dtype)
    if kernels is not None and head_dim % (kernels.vector_bytes() // dtype.itemsize) == 0:
        def kernel(q, keys, values, step: StepInputs, scale: float) -> torch.Tensor:
            return kernels.decode_attention(q, keys, values, step.lengths, scale)
        return kernel

    def sdpa(q, keys, values, step: StepInputs, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, scale=scale)
    return sdpa
