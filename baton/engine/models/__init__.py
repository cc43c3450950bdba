"""The architectures the model runner supports, keyed by Hugging Face `config.model_type`.

Each family is one module that says how to read a decoder layer's weights into `LayerWeights`
(baton/engine/models/layer.py); the runner (baton/engine/runner.py) asks `layer_reader` and runs every
family with the same tensor code. A new architecture is one module plus one line in `FAMILIES`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from baton.engine.models import llama, qwen2, qwen3
from baton.engine.models.layer import LayerWeights

FAMILIES = (llama, qwen2, qwen3)
REGISTRY: dict[str, Callable[[torch.nn.Module], LayerWeights]] = {
    t: family.layer_weights for family in FAMILIES for t in family.MODEL_TYPES}


def layer_reader(model_type: str) -> Callable[[torch.nn.Module], LayerWeights]:
    """The function that reads one HF decoder layer of this model type; a clear error for others."""
    reader = REGISTRY.get(model_type)
    if reader is None:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(REGISTRY)}")
    return reader
