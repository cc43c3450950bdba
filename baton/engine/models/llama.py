"""Llama and Mistral: the plain layout (Q/K/V biases only where config.attention_bias says so,
which `fuse` picks up from the modules). Mistral's sliding window is not applied: a row attends
over all its tokens, so past `config.sliding_window` tokens (4,096 in Mistral v0.1; v0.2 on set
none) it would see more than HF's mask lets it."""
from __future__ import annotations

import torch

from baton.engine.models.layer import LayerWeights, llama_layout

MODEL_TYPES = ("llama", "mistral")


def layer_weights(layer: torch.nn.Module) -> LayerWeights:
    return llama_layout(layer)
