"""Log-probabilities as the OpenAI API shapes them, from the router's TokenLogprobs (one per token).

The values are log-softmax of the raw model logits (before penalties, logit_bias and temperature:
vLLM's default, see baton/engine/sampler.py). A token's text is what the model's tokenizer decodes it to
alone (as vLLM's); without a tokenizer in this process it is spelled `token_id:<id>` (vLLM's
`return_tokens_as_token_ids` form)."""
from __future__ import annotations

from typing import Any


class TokenText:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = (self.tokenizer.decode([token_id]) if self.tokenizer is not None
                                           else f"token_id:{token_id}")
        return text


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_content(ids, lps, text: TokenText) -> list[dict]:
    """`choices[i].logprobs.content` items for these tokens."""
    return [{**_entry(text(t), lp.logprob), "top_logprobs": [_entry(text(c.token_id), c.logprob) for c in lp.top]}
            for t, lp in zip(ids, lps)]


class CompletionLogprobs:
    """`choices[i].logprobs` of /v1/completions ({tokens, token_logprobs, top_logprobs, text_offset}),
    built a message at a time; text_offset counts on from one message to the next."""

    def __init__(self, text: TokenText):
        self.text, self.offset = text, 0

    def add(self, ids, lps) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(ids, lps):
            s = self.text(t)
            top = {self.text(c.token_id): c.logprob for c in lp.top}
            top.setdefault(s, lp.logprob)   # the chosen token is always among them (OpenAI, vLLM)
            for k, v in (("tokens", s), ("token_logprobs", lp.logprob), ("top_logprobs", top),
                         ("text_offset", self.offset)):
                out[k].append(v)
            self.offset += len(s)
        return out


def choice_logprobs(ids, lps, text: TokenText, chat: bool) -> dict | None:
    """A whole choice's `logprobs` (None when the request asked for none)."""
    if not lps:
        return None
    return {"content": chat_content(ids, lps, text)} if chat else CompletionLogprobs(text).add(ids, lps)
