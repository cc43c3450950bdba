"""Per-system metrics from each query's token times."""
from __future__ import annotations

import numpy as np


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def latencies(queries, token_times: dict[int, list[float]], start: float) -> dict[str, list[float]]:
    """TTFT, TPOT and end-to-end latency per query (s)."""
    ttft, tpot, e2e = [], [], []
    for q in queries:
        t = token_times.get(q.index) or []
        if not t:
            continue
        arrival = start + q.arrival_s
        ttft.append(t[0] - arrival)
        e2e.append(t[-1] - arrival)
        if len(t) > 1:
            tpot.append((t[-1] - t[0]) / (len(t) - 1))
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e}


def summarize(queries, token_times: dict[int, list[float]], start: float, idle_token_fraction: float = 0.0,
              extra: dict | None = None) -> dict:
    lat = latencies(queries, token_times, start)
    tokens = sum(len(t) for t in token_times.values())
    ends = [t[-1] for t in token_times.values() if t]
    wall = (max(ends) - start) if ends else float("nan")
    out = {"output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
           "queries_per_s": len(ends) / wall if wall > 0 else 0.0,
           "wall_s": wall, "num_queries": len(ends), "output_tokens": tokens,
           "idle_token_fraction": idle_token_fraction}
    for name, values in lat.items():
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _pct(values, q)
    out.update(extra or {})
    return out
