"""K/V transfer time between a prefill and a decode worker in their own network namespaces
(tests/netlab.py: tbf-shaped veths, delay from tc netem or, without sch_netem, a userspace relay).

    .venv/bin/python tests/netns_bench.py [--model DIR] [--reps 3] [--tokens 512,2048]

Default model: a random Llama with SmolLM2-135M's K/V dimensions (30 layers, 3 K/V heads of 64,
float32: 46 080 K/V bytes per token) and a tiny MLP and vocabulary, so that the prefill compute
does not dominate a 2-core machine; the bytes on the wire are those of the real model. Prints a
markdown table: per link (rate, delay) and prompt length, the median of --reps transfers of the
router's kv_transfer_s (the prefill worker's TransferKV call, until the decode worker admitted
the K/V), the bytes, the achieved rate, and what the link rate alone would take.
Not collected by pytest (no test_ prefix); needs root for `ip netns`.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netlab import net_cluster, why_not_permitted  # noqa: E402

LINKS = [(None, 0.0), (None, 1.0), ("1gbit", 1.0), ("10gbit", 1.0)]   # (tbf rate or None: unshaped, delay ms)
RATE_BPS = {"1gbit": 1e9, "10gbit": 1e10}


def smollm2_kv_dims_model(path: str) -> str:
    """A random Llama whose K/V per token is SmolLM2-135M's (30 x 2 x 3 x 64 x 4 bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=64, num_hidden_layers=30,
                      num_attention_heads=3, num_key_value_heads=3, head_dim=64, max_position_embeddings=4096,
                      eos_token_id=255, bos_token_id=1, pad_token_id=0, rope_theta=100000.0)
    LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(path)
    return path


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def measure(model_dir: str, rate: str | None, delay_ms: float, lengths: list[int], reps: int) -> tuple[str, list]:
    from router.client import RouterClient
    rng, rows = random.Random(0), []
    with net_cluster(model_dir, {"pf": "prefill", "dc": "decode"}, rate=rate, delay_ms=delay_ms,
                     worker_args=["--dtype", "float32", "--max-batch", "2"]) as (lab, router, _), \
            RouterClient(router.address) as c:
        for n in lengths:
            runs = []
            for i in range(reps + 1):     # the first one warms the channel and the allocator
                _, _, last = c.complete([rng.randrange(1, 255) for _ in range(n)], max_new_tokens=1, timeout=300)
                if i:
                    runs.append((last.kv_transfer_s, last.kv_bytes))
            rows.append((n, statistics.median(s for s, _ in runs), runs[0][1], [round(s, 4) for s, _ in runs]))
        return lab.emulated, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model directory (default: SmolLM2-135M's K/V dims, see above)")
    p.add_argument("--tokens", default="512,2048")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    if reason := why_not_permitted():
        print(f"netns_bench: {reason}", file=sys.stderr)
        return 2
    lengths = [int(t) for t in a.tokens.split(",")]
    model_dir = a.model or smollm2_kv_dims_model(tempfile.mkdtemp(prefix="baton-kvdims-") + "/model")
    print(f"machine: {machine()}\n")
    print("| link (as emulated) | prompt tokens | K/V bytes | kv_transfer_s median | runs | achieved | link rate alone |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for rate, delay in LINKS:
        t = time.monotonic()
        emulated, rows = measure(model_dir, rate, delay, lengths, a.reps)
        for n, med, nbytes, runs in rows:
            wire = f"{nbytes * 8 / RATE_BPS[rate]:.4f} s" if rate else "-"
            print(f"| {emulated} | {n} | {nbytes:,} | {med:.4f} s | {runs} | {nbytes * 8 / med / 1e9:.2f} Gbit/s | {wire} |",
                  flush=True)
        print(f"<!-- {rate} {delay} ms: {time.monotonic() - t:.0f} s -->", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
