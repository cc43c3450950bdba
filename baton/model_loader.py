"""Load a model and its tokenizer: the built-in `smollm2` or any local Hugging Face directory
(where its files come from, and the tokenizer alone: baton/model_files.py)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.grammar import Grammars
from baton.kv_codec import DTYPES  # noqa: F401 (re-exported) a model serves in a dtype its K/V can travel in
from baton.model_files import gguf_of, has_tokenizer, model_dir


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module        # a transformers causal LM, eval mode, on its device
    tokenizer: object
    eos_ids: frozenset[int]
    gguf: Path | None = None      # the GGUF its weights were widened from (the built-in smollm2)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """The compiler of output constraints (JSON schema, regex, grammar) for this model's tokenizer."""
        return Grammars(self.tokenizer, self.model.config.vocab_size, self.eos_ids)

    @property
    def max_len(self) -> int:
        """Tokens a request may hold: the model's context, or its sliding attention window where HF
        applies one (Mistral v0.1's 4,096; Qwen2/3 with use_sliding_window): baton's attention is
        over a row's whole context, which equals the windowed one while a row fits the window."""
        cfg = self.model.config
        window = getattr(cfg, "sliding_window", None)
        windowed = cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)
        return min(cfg.max_position_embeddings, window) if windowed and window else cfg.max_position_embeddings


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, dtype: str, device: str = "auto") -> str:
    """`auto` (vLLM's): the model's own dtype (config.json's torch_dtype, or dtype) on a GPU, float32
    on CPU, where half precision is slow and float32 is what the exact-token tests compare. The
    built-in smollm2 is Q4_1 dequantised to float32, so it is float32 either way."""
    if dtype != "auto":
        return dtype
    if resolve_device(device).type == "cpu":
        return "float32"
    from baton.model_files import model_config
    config = model_config(name)
    own = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return own if own in DTYPES else "float32"


def load_model(name: str = "smollm2", dtype: str = "float32", device: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = resolve_dtype(name, dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = model_dir(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # loading a safetensors copy is quick; the conversion keeps its bar
    tok = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None  # tiny test models have none
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(resolve_device(device)).eval()
    return LoadedModel(name=name, model=model, tokenizer=tok, eos_ids=eos_ids_of(model, tok), gguf=gguf_of(name))


def eos_ids_of(model, tokenizer) -> frozenset[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
