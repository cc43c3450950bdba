"""The only module that runs the model: prefill one query, decode one step of a batch.

It reuses the Hugging Face modules' weights and sub-layers (norms, projections, MLP,
rotary embedding, LM head) so the numerics match `generate()`; only attention is ours,
because the batch's K/V lives in BATON's shared cache (see kv_cache.py).
Supported: decoder-only Llama-family models (llama, mistral, qwen2, qwen3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.kv_cache import BatchKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ModelRunner:
    def __init__(self, hf_model: torch.nn.Module):
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {cfg.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.hf = hf_model.eval().requires_grad_(False)
        self.body = hf_model.model
        self.layers = list(self.body.layers)
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.dtype = next(hf_model.parameters()).dtype
        self.device = next(hf_model.parameters()).device

    def _qkv(self, attn, x: torch.Tensor, pos: torch.Tensor):
        """x: (B, T, hidden), pos: (B, T) -> q (B, Hq, T, D), k/v (B, Hkv, T, D) after RoPE."""
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _set_rope(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        cos, sin = self.body.rotary_emb(x, position_ids=pos)  # (B, T, D)
        self._rope = (cos.unsqueeze(1), sin.unsqueeze(1))     # (B, 1, T, D)

    def _mlp_block(self, layer, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.body.norm(h))

    def prefill(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one query's prompt alone: its last position's logits (V,) and K/V (L, 2, Hkv, P, D)."""
        return self.prefill_many([token_ids])[0]

    @torch.no_grad()
    def prefill_many(self, prompts: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill several queries in one pass, each on its own: projections and MLP run on their
        concatenated tokens (one read of the weights), attention is causal within each query.
        Returns per query its last logits (V,) and K/V (L, 2, Hkv, P, D) in the model dtype."""
        lens = [len(p) for p in prompts]
        N = sum(lens)
        ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=self.device)  # (1, N)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens]).unsqueeze(0)          # (1, N)
        starts = [sum(lens[:i]) for i in range(len(lens))]
        kvs = [torch.empty(self.num_layers, 2, self.num_kv_heads, n, self.head_dim, dtype=self.dtype,
                           device=self.device) for n in lens]
        h = self.body.embed_tokens(ids)                                                           # (1, N, hidden)
        self._set_rope(h, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), pos)                             # (1, H, N, D)
            outs = []
            for kv, a, n in zip(kvs, starts, lens):
                kv[i, 0], kv[i, 1] = k[0, :, a:a + n], v[0, :, a:a + n]
                outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n],
                                                           is_causal=True, scale=self.scale, enable_gqa=self.group > 1))
            o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)                             # (1, Hq, N, D)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, N, -1))
            h = self._mlp_block(layer, h)
        last = torch.tensor([a + n - 1 for a, n in zip(starts, lens)], device=self.device)
        logits = self._logits(h[0, last])                                                         # (n, V)
        return [(logits[j], kvs[j]) for j in range(len(prompts))]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: BatchKVCache) -> torch.Tensor:
        """One decode step for the cache's n rows: tokens (n,) -> logits (n, V).

        Writes each row's new K/V into the next free column of the cache (no copy of the
        rest), then attends over the columns that hold some row's tokens.
        """
        n = tokens.shape[0]
        pos = cache.positions().unsqueeze(1)                        # (n, 1)
        col = cache.append_column()                                 # column for this step's K/V
        mask = cache.attention_mask()                               # (n, 1, 1, T) bool
        h = self.body.embed_tokens(tokens.unsqueeze(1))             # (n, 1, hidden)
        self._set_rope(h, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), pos)
            keys, values = cache.layer_views(i)                    # (n, Hkv, T, D) views
            keys[:, :, col - cache.start] = k[:, :, 0]
            values[:, :, col - cache.start] = v[:, :, 0]
            # GQA without repeating K/V: the group's query heads act as query positions.
            q = q.reshape(n, self.num_kv_heads, self.group, self.head_dim)  # (n, Hkv, G, D)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            h = h + attn.o_proj(o.reshape(n, 1, -1))
            h = self._mlp_block(layer, h)
        cache.commit_step()
        return self._logits(h[:, 0])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
