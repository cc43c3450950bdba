"""Llama and Mistral: the plain layout (Q/K/V biases only where config.attention_bias says so,
which `fuse` picks up from the modules). Mistral's sliding window is honoured by the context
cap (baton/model_loader.py `LoadedModel.max_len`): no row outgrows it, so attending over a row's
whole context is the windowed attention HF computes."""
from __future__ import annotations

import torch

from baton.engine.models.layer import LayerWeights, llama_layout

MODEL_TYPES = ("llama", "mistral")


def layer_weights(layer: torch.nn.Module) -> LayerWeights:
    return llama_layout(layer)
