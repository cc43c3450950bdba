"""Tiny random Llama models built in the test itself (float64: exact-token comparisons are reliable)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baton.model_loader import LoadedModel, eos_ids_of

VOCAB = 256
EOS = 255


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, layers: int = 2) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=EOS, bos_token_id=1, pad_token_id=0, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return LoadedModel(name="tiny", model=model, tokenizer=None, eos_ids=eos_ids_of(model, None))


def reference_greedy(model: LoadedModel, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """transformers' generate() for one query alone, on the model's device."""
    ids = torch.tensor([prompt], device=model.model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    if ignore_eos:
        kwargs["eos_token_id"] = None
    out = model.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt):].tolist()


def engine_greedy(model: LoadedModel, prompts: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
    """Greedy tokens (ignore_eos) of many prompts at once, by the engine in process, all in one
    batch: tests/test_engine_exact.py proves the engine equal to generate() whatever the
    batch-mates, and one generate() per prompt costs seconds when a test checks hundreds."""
    from baton.engine.config import EngineConfig
    from baton.engine.engine import Engine
    from baton.sampling import SamplingParams
    if not prompts:
        return []
    ns = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    engine = Engine(model, EngineConfig(max_batch=32, max_queue=len(prompts)))
    done = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in ns])
    return [r.output_ids for r in done]


def save_tiny(path, seed: int = 0, layers: int = 2) -> str:
    """A tiny random Llama as a Hugging Face directory (no tokenizer), for worker processes."""
    m = tiny_llama(seed, layers=layers)
    m.model.save_pretrained(path)
    return str(path)


def save_tokenizer(model_dir: str) -> None:
    """A word-level tokenizer over the tiny model's 256 ids: "w3".."w254" are words, 255 is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, EOS)}, "</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(model_dir)


def save_char_tokenizer(model_dir: str) -> None:
    """A character-level tokenizer over the tiny model's 256 ids: 3..97 are the printable ASCII
    characters (JSON can be spelled), 98..254 filler words, 255 is EOS."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    vocab.update({f"w{i}": i for i in range(3 + len(chars), EOS)})
    vocab["</s>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(model_dir)


def tiny_family(model_type: str, seed: int = 0, **config) -> LoadedModel:
    """A tiny random model of one supported architecture (float64), the tiny Llama's shape; `config`:
    more of its config, or another shape. Biases and norm weights are drawn at random too: at init they are zeros and
    ones, which would hide a family's weight read wrongly."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    extra = {"head_dim": 16, "attention_bias": True} if model_type == "qwen3" else {}
    if model_type in ("mistral", "qwen2"):
        extra["sliding_window"] = None
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
                 tie_word_embeddings=False)
    cfg = AutoConfig.for_model(model_type, **{**shape, **extra, **config})
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return LoadedModel(name=f"tiny-{model_type}", model=model, tokenizer=None, eos_ids=eos_ids_of(model, None))
