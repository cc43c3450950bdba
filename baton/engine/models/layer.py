"""What the runner needs of one decoder layer, whatever the family, and the regrouping that
makes its matmuls few and large."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerWeights:
    in_norm: torch.Tensor                 # (hidden,)
    qkv: torch.Tensor                     # (Hq*D + 2*Hkv*D, hidden): Q, K, V stacked
    qkv_bias: torch.Tensor | None         # (Hq*D + 2*Hkv*D,) qwen2; llama/qwen3 with config.attention_bias
    o: torch.Tensor                       # (hidden, Hq*D)
    o_bias: torch.Tensor | None           # (hidden,) with config.attention_bias (llama, qwen3)
    post_norm: torch.Tensor               # (hidden,)
    gate_up: torch.Tensor                 # (2*I, hidden): gate, up stacked
    gate_up_bias: torch.Tensor | None     # (2*I,) with config.mlp_bias (llama)
    down: torch.Tensor                    # (hidden, I)
    down_bias: torch.Tensor | None        # (hidden,)
    q_norm: torch.Tensor | None = None    # (D,) per-head RMSNorm of q and k before RoPE (qwen3)
    k_norm: torch.Tensor | None = None


def fuse(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the linears' weights (and biases, if any has one) into one tensor and make each
    module's weight a view of it: nothing is stored twice, and `generate()` still runs on the
    same numbers."""
    weight = torch.cat([m.weight.data for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.data if b is not None else weight.new_zeros(m.out_features) for m, b in zip(modules, biases)])
    row = 0
    for m in modules:
        n = m.out_features
        m.weight.data = weight[row:row + n]
        if m.bias is not None:
            m.bias.data = bias[row:row + n]
        row += n
    return weight, bias


def llama_layout(layer: torch.nn.Module, **extra: torch.Tensor) -> LayerWeights:
    """The Llama layer's modules (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms),
    which every supported family shares, biases wherever the checkpoint has them; `extra`: the
    family's own weights (q_norm, k_norm)."""
    a, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = fuse([a.q_proj, a.k_proj, a.v_proj])
    gate_up, gate_up_bias = fuse([mlp.gate_proj, mlp.up_proj])
    return LayerWeights(layer.input_layernorm.weight, qkv, qkv_bias, a.o_proj.weight, a.o_proj.bias,
                        layer.post_attention_layernorm.weight, gate_up, gate_up_bias,
                        mlp.down_proj.weight, mlp.down_proj.bias, **extra)
