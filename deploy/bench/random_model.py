"""A model directory with another model's config and tokenizer and random weights: for speed checks
on a machine the real weights cannot reach (a GPU box with no network); speed does not depend on
the weights' values, tokens do (never use it for correctness).

    python -m deploy.bench.random_model --like smollm2 --out /tmp/smollm2-random
    python -m deploy.bench.random_model --like DIR_WITH_CONFIG_AND_TOKENIZER --out DIR
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

KEEP = ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "special_tokens_map.json")


def make(like: str, out: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from baton.model_files import model_dir
    src, dst = model_dir(like), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst), dtype=torch.float32).save_pretrained(dst)
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m deploy.bench.random_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", default="smollm2", help="smollm2 or a directory with config.json and tokenizer files "
                                                     "(default: %(default)s)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="weights' seed (default: %(default)s)")
    a = p.parse_args(argv)
    print(f"random weights shaped like {a.like} at {make(a.like, a.out, a.seed)}")


if __name__ == "__main__":
    main()
