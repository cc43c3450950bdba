"""Qwen2: the Llama layout with a bias on the Q, K and V projections (fused with them)."""
from __future__ import annotations

import torch

from baton.engine.models.layer import LayerWeights, llama_layout

MODEL_TYPES = ("qwen2",)


def layer_weights(layer: torch.nn.Module) -> LayerWeights:
    w = llama_layout(layer)
    if w.qkv_bias is None:
        raise ValueError("a qwen2 layer without Q/K/V biases: not a Qwen2 checkpoint")
    return w
