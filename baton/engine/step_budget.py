"""How many prompt tokens the next step may carry (chunked prefill), from what steps cost here.

A colocated step runs the batch's decode rows and newcomers' prompt pieces in one pass over the
weights, so every running row waits for the pieces in its step. A fixed token budget means a
different step time on every machine (a 128-token piece is ~0.1 s on one CPU, several tenths on
another, a millisecond on a GPU). Instead the budget is sized from a cost model learned online:

    step seconds ~= decode(rows) + per_token * prompt_tokens

`decode(rows)` is the median of recent steps with no prompt piece (per power-of-two row count;
the nearest count measured stands in for one not measured yet), `per_token` the median of what
recent pieces added on top of it per token: medians, so that a first step's one-off costs (the
cache's pages touched for the first time) or a pause of the machine do not steer the budget. By default (`auto`) the pieces may add
`decode(rows) * max(1, starting / rows)`, where `starting` counts the prompts that would take a
row now (in prefill, or waiting with a row free for them): with a steady trickle of arrivals a
step carrying a prompt takes at most twice the decode step, so running rows keep their pace;
when more requests wait for their first token than rows run (a burst), the waiting get the step
in proportion, so newcomers still get their first token soon and the batch fills. A fixed
target in milliseconds is the other choice. The token budget (`--max-num-batched-tokens`) stays
the ceiling, and a floor keeps every prompt moving. With no running rows the whole token budget
is used: nobody waits for the step.

Without a time budget (the default) the token budget alone sizes the step: a quarter of it beside
running rows, more in proportion once prompts waiting for a first token outnumber the running rows,
all of it at 4 to 1 (a burst) or with no running rows. A steady load so gets 512 of the
default 2,048 tokens a step, and a burst vLLM's 2,048: on a 2-core Zen 2 (AVX2), bursts of 32 requests
through the endpoint went 135.5-141.4 -> 141.4-149.6 tok/s and TTFT p50 4.46-4.89 -> 3.67-4.66 s
against 512 every step, equal at 4 and 8 q/s (docs/benchmarks.md).

Opt-in (`--step-time-budget auto|MS`; off by default), by measurement: splitting the same prompt
work over more steps does not lower the mean time per output token, it only spreads the stalls.
On a 2-core Xeon (docs/benchmarks.md) `auto` halved the longest gaps between a stream's tokens
(ITL p99 258 against 595 ms at 4 q/s) but tripled the median time to first token (1.89 against
0.56 s) and lost 10-20 % of the throughput, since prompts then join the batch later.
"""
from __future__ import annotations

import math
import statistics
from collections import deque


def parse(text: str) -> float | None:
    """--step-time-budget: 'auto' -> 0.0 (twice the decode step), 'off' -> None (tokens only),
    a number -> that many milliseconds."""
    if text == "auto":
        return 0.0
    if text == "off":
        return None
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not ms > 0 or math.isinf(ms):
        raise ValueError(f"a step time in milliseconds > 0, 'auto' or 'off'; got {text!r}")
    return ms


SHARE = 4   # beside running rows a step carries a quarter of the token budget, more once prompts waiting for
            # a first token outnumber the running rows, all of it at SHARE to 1 (a burst)


class StepBudget:
    def __init__(self, max_tokens: int, target_ms: float | None = 0.0, *, factor: float = 2.0,
                 min_tokens: int = 32, window: int = 9):
        """target_ms: None = always max_tokens; 0 = auto (see above); > 0 = that time."""
        self.max_tokens, self.target_ms, self.factor = max_tokens, target_ms, factor
        self.min_tokens, self.window = min(min_tokens, max_tokens), window
        self.decode_samples: dict[int, deque[float]] = {}   # power-of-two rows -> seconds of decode-only steps
        self.token_samples: deque[float] = deque(maxlen=window)   # seconds one prompt token added to a step

    @staticmethod
    def _bucket(rows: int) -> int:
        return 1 << max(0, rows - 1).bit_length()

    @property
    def decode_s(self) -> dict[int, float]:
        return {b: statistics.median(s) for b, s in self.decode_samples.items()}

    @property
    def token_s(self) -> float | None:
        return statistics.median(self.token_samples) if self.token_samples else None

    def _decode(self, rows: int) -> float | None:
        if rows == 0:
            return 0.0
        if not self.decode_samples:
            return None
        want = self._bucket(rows)
        nearest = min(self.decode_samples, key=lambda b: abs(b.bit_length() - want.bit_length()))
        return statistics.median(self.decode_samples[nearest])

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        """A step ran `rows` decode rows and `tokens` prompt tokens in `seconds`."""
        if tokens == 0:
            if rows:
                self.decode_samples.setdefault(self._bucket(rows), deque(maxlen=self.window)).append(seconds)
            return
        decode = self._decode(rows)
        if decode is not None and tokens >= self.min_tokens:   # short pieces say more about overhead than tokens
            self.token_samples.append(max(0.0, seconds - decode) / tokens)

    def target_s(self, rows: int, starting: int = 0) -> float | None:
        """What a step with prompt pieces may take beside `rows` running rows while `starting`
        prompts wait for their first token (None: not known yet)."""
        decode = self._decode(rows)
        if self.target_ms:
            return self.target_ms / 1e3
        return None if decode is None else decode * (1 + max(self.factor - 1, starting / max(rows, 1)))

    def tokens(self, rows: int, starting: int = 0) -> int:
        """Prompt tokens the next step may carry beside `rows` running rows, `starting` prompts
        waiting for their first token (in prefill, or waiting with a row free for them)."""
        if rows == 0:
            return self.max_tokens
        if self.target_ms is None:
            share = min(1.0, max(1 / SHARE, starting / (SHARE * rows)))
            return max(self.min_tokens, int(self.max_tokens * share))
        target, decode = self.target_s(rows, starting), self._decode(rows)
        if target is None or decode is None or not self.token_s:
            return self.max_tokens          # still learning: the first steps measure with the full budget
        fit = int((target - decode) / self.token_s + 1e-6)     # 1e-6: 49.999... tokens is 50
        return max(self.min_tokens, min(self.max_tokens, fit))

    def describe(self) -> str:
        if self.target_ms is None:
            return f"step budget {self.max_tokens} prompt tokens (a quarter beside running rows, but in a burst)"
        when = f"{self.target_ms:g} ms" if self.target_ms else f"{self.factor:g}x the decode step or more while prompts wait"
        return f"step budget {when} (at most {self.max_tokens} prompt tokens)"
