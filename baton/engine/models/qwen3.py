"""Qwen3: the Llama layout plus a per-head RMSNorm of q and k before RoPE (q_norm, k_norm)."""
from __future__ import annotations

import torch

from baton.engine.models.layer import LayerWeights, llama_layout

MODEL_TYPES = ("qwen3",)


def layer_weights(layer: torch.nn.Module) -> LayerWeights:
    a = layer.self_attn
    return llama_layout(layer, q_norm=a.q_norm.weight, k_norm=a.k_norm.weight)
