"""`baton bench serve`'s results as text: the summary `vllm bench serve` prints, and a markdown
table with one row per server."""
from __future__ import annotations

METRICS = ("ttft", "tpot", "itl", "e2el")   # vLLM's names; e2el = end-to-end latency


def _fmt(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def format_report(r: dict) -> str:
    """The result as `vllm bench serve` prints it."""
    rows = [("Successful requests:", r["completed"], "{}"), ("Failed requests:", r["failed"], "{}"),
            ("Benchmark duration (s):", r["duration"], None), ("Total input tokens:", r["total_input_tokens"], "{}"),
            ("Total generated tokens:", r["total_output_tokens"], "{}"),
            ("Request throughput (req/s):", r["request_throughput"], None),
            ("Request goodput (req/s):", r.get("request_goodput"), None),
            ("Output token throughput (tok/s):", r["output_throughput"], None),
            ("Total token throughput (tok/s):", r["total_token_throughput"], None)]
    lines = ["{s:=^50}".format(s=" Serving Benchmark Result ")]
    lines += [f"{name:<40}{_fmt(v, fmt or '{:.2f}'):<10}" for name, v, fmt in rows if v is not None]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for m in METRICS:
        lines.append("{s:-^50}".format(s=titles[m]))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            lines.append(f"{f'{label} {m.upper()} (ms):':<40}{_fmt(r[f'{stat}_{m}_ms']):<10}")
    return "\n".join(lines + ["=" * 50])


def markdown_table(results: dict[str, dict]) -> str:
    """One row per server (name -> run_serve_bench result)."""
    cols = [("completed", "ok", "{}"), ("failed", "failed", "{}"), ("request_throughput", "req/s", "{:.2f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("total_token_throughput", "total tok/s", "{:.1f}"),
            ("request_goodput", "goodput req/s", "{:.2f}")]
    cols += [(f"{s}_{m}_ms", f"{m.upper()} {s} ms", "{:.1f}") for m in METRICS for s in ("median", "p99")]
    lines = ["| server | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        lines.append(f"| `{name}` | " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines)
