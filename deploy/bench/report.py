"""Benchmark output: results.json, a markdown table, PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = [("output_tokens_per_s", "out tok/s", "{:.1f}"), ("queries_per_s", "q/s", "{:.2f}"),
           ("ttft_p50_s", "TTFT p50 s", "{:.2f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
           ("tpot_p50_s", "TPOT p50 s", "{:.3f}"), ("tpot_p99_s", "TPOT p99 s", "{:.3f}"),
           ("e2e_p50_s", "e2e p50 s", "{:.2f}"), ("e2e_p99_s", "e2e p99 s", "{:.2f}"),
           ("idle_token_fraction", "idle frac", "{:.3f}")]


def _fmt(fmt: str, v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown_table(systems: dict[str, dict]) -> str:
    refs = [r for r in ("orca", "hf_continuous") if r in systems]
    head = ["system"] + [c[1] for c in COLUMNS] + [f"× {r}" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in systems.items():
        row = [f"`{name}`"] + [_fmt(fmt, s.get(key)) for key, _, fmt in COLUMNS]
        row += [f"{s['output_tokens_per_s'] / systems[r]['output_tokens_per_s']:.2f}" for r in refs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, config: dict, systems: dict[str, dict], sweep: dict | None = None,
                 latencies: dict[str, dict[str, list[float]]] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "systems": systems, "sweep": sweep or {}},
                                                 indent=2, default=float))
    md = [markdown_table(systems)]
    if "kv_transfer_bytes" in systems.get("baton_grpc", {}):
        g = systems["baton_grpc"]
        md.append(f"\n`baton_grpc` moved {g['kv_transfer_bytes'] / 2**20:.1f} MiB of K/V prefill → decode "
                  f"in {g['kv_transfer_s']:.2f} s in all.")
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plots(out, systems, sweep or {}, latencies or {})
    return out


def _plots(out: Path, systems: dict, sweep: dict, latencies: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(systems)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [systems[n]["output_tokens_per_s"] for n in names],
           color=["tab:red" if n.startswith("baton") else "tab:gray" for n in names])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput on one workload")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ttft", "e2e")):
        for n, lat in latencies.items():
            vals = sorted(lat.get(key, []))
            if vals:
                ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=n)
        ax.set_xlabel(f"{key.upper()} (s)")
        ax.set_ylabel("fraction of queries")
        ax.set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for n, points in sweep.items():
            rates = [p["rate_qps"] for p in points]
            axes[0].plot(rates, [p["output_tokens_per_s"] for p in points], marker="o", label=n)
            axes[1].plot(rates, [p["tpot_p99_s"] for p in points], marker="o", label=n)
        axes[0].set_xlabel("arrival rate (queries/s)")
        axes[0].set_ylabel("output tokens/s")
        axes[1].set_xlabel("arrival rate (queries/s)")
        axes[1].set_ylabel("TPOT p99 (s)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_rate.png", dpi=110)
        plt.close(fig)
