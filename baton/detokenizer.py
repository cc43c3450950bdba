"""Incremental detokenisation with stop strings.

Emits only text that is final: never half a UTF-8 character (the tokenizer's U+FFFD
while a multi-byte character is incomplete) and never a prefix of a stop string that
the next tokens might complete.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

# transformers' own fast-tokenizer decode, which with clean-up off is exactly the Rust tokenizer's
# decode; a subclass that overrides it keeps its own.
_PLAIN_DECODES = ("TokenizersBackend._decode", "PreTrainedTokenizerFast._decode")


def rust_backend(tokenizer):
    """The Rust tokenizer whose decode is exactly `tokenizer.decode(..., clean_up_tokenization_spaces=False)`,
    or None (a slow tokenizer, or a fast one whose class decodes its own way)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(type(tokenizer)._decode, "__qualname__", "") in _PLAIN_DECODES:
        return backend
    return None


def decoder(tokenizer):
    """ids -> text as `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`
    gives it: the Rust decode called directly where it is the same (transformers' Python wrapper
    converts and checks its arguments each call: ~28 % of the tiny model's step when a worker
    decoded twice per token of every row through it)."""
    backend = rust_backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self._decode = decoder(tokenizer)
        self.ids: list[int] = list(prompt_ids[-6:])   # a little context so word-initial spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # The same prefix/read-offset rule in Rust, one call a token (2.1 -> 0.65 us a token for
        # SmolLM2's tokenizer, measured); `ids` and the offsets still follow it, for flush().
        self._backend = rust_backend(tokenizer)
        self._stream = DecodeStream(ids=self.ids, skip_special_tokens=True) if self._backend is not None else None
        self.stop = stop
        self.text = ""           # all final text decoded so far
        self.emitted = 0         # how much of self.text was handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text that is safe to send (may be '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        new = self._new_text(token_id)
        if new is not None:
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _new_text(self, token_id: int) -> str | None:
        """The text the newest token completes, None while it completes none (or half a character)."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id)
            except Exception:   # noqa: BLE001 - the decode rewrote earlier text: the rule below copes
                self._stream = None
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) and not full.endswith("\ufffd") else None

    def _release(self) -> str:
        if not self.stop:   # most requests: all final text goes out
            out = self.text[self.emitted:]
            self.emitted = len(self.text)
            return out
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text)
        if not self.stopped:
            end -= self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def flush(self) -> str:
        """At the end: whatever is left. Held-back stop prefixes are real text after all, and the
        bytes of a character that never completed decode as U+FFFD, as a whole decode() gives them
        (else a completion of only such bytes would come back with no text at all)."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)
        out = self._release()          # a stop string the tail completes still cuts the text
        if not self.stopped:
            out += self.text[self.emitted:]
            self.emitted = len(self.text)
        return out
