"""Incremental detokenisation: no half characters, stop strings cut exactly, text joins up."""
import pytest

from baton.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """One token per UTF-8 byte: multi-byte characters arrive in pieces."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def _run(text, stop=()):
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, tok.encode("ctx:"), stop)
    pieces = [d.add(t) for t in tok.encode(text)]
    pieces.append(d.flush())
    return pieces, d


def test_never_emits_half_a_character():
    pieces, _ = _run("naïve 日本語 ok 🎉!")
    assert "".join(pieces) == "naïve 日本語 ok 🎉!"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text, stop, expected", [
    ("hello world. bye", ("world",), "hello "),
    ("a<|end|>b", ("<|end|>",), "a"),
    ("abcabd", ("abd",), "abc"),
    ("no stop here", ("zzz",), "no stop here"),
    ("stop at end", ("end",), "stop at "),
])
def test_stop_strings(text, stop, expected):
    pieces, d = _run(text, stop)
    assert "".join(pieces) == expected
    assert d.stopped == (expected != text)


def test_stop_prefix_is_held_back_until_decided():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, [], ("END",))
    assert [d.add(t) for t in tok.encode("xE")] == ["x", ""]
    assert d.add(ord("N")) == ""
    assert d.add(ord("d")) == "ENd"  # not the stop string after all


@pytest.mark.parametrize("raw", [b"ok \xe2\x82", b"\x80\x80\x80", b"\xf0\x9f"])
def test_bytes_of_an_unfinished_character_come_out_at_the_end_as_the_whole_decode_gives_them(raw):
    """A completion cut inside a multi-byte character, or made only of bytes that never form one
    (a random model's loop), ends with U+FFFD where decode() puts it, never with no text at all."""
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, tok.encode("ctx:"))
    pieces = [d.add(t) for t in raw]
    pieces.append(d.flush())
    assert "".join(pieces) == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in pieces[-1] and d.flush() == ""


def test_a_stop_string_completed_by_the_last_bytes_still_cuts():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, [], ("b\ufffd",))
    pieces = [d.add(t) for t in b"ab\xe2"]
    pieces.append(d.flush())
    assert "".join(pieces) == "a" and d.stopped


def _tokenizers(tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny_model import save_char_tokenizer, save_tokenizer
    out = []
    for i, save in enumerate((save_tokenizer, save_char_tokenizer)):
        save(str(tmp_path / str(i)))
        out.append(AutoTokenizer.from_pretrained(str(tmp_path / str(i))))
    from baton.model_files import smollm2_dir
    try:   # the real BPE (byte-level, special tokens) where its converted copy is at hand
        out.append(AutoTokenizer.from_pretrained(smollm2_dir()))
    except Exception:
        pass
    return out


def test_the_direct_decode_is_the_tokenizer_s_own(tmp_path):
    """A fast tokenizer's Rust decode, called directly (baton.detokenizer.decoder), gives exactly what
    tokenizer.decode gives, special tokens and broken characters included."""
    import random

    from baton.detokenizer import decoder
    rng = random.Random(0)
    for tok in _tokenizers(tmp_path):
        fast = decoder(tok)
        for _ in range(200):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
            assert fast(ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), ids


def test_the_rust_decode_stream_emits_the_same_pieces_as_the_offset_rule(tmp_path):
    """IncrementalDetokenizer steps a fast tokenizer's Rust DecodeStream: piece for piece it gives what
    the prefix/read-offset rule in Python gives (the same tokens, the same flush), special tokens and
    broken characters included."""
    import random
    rng = random.Random(1)
    for tok in _tokenizers(tmp_path):
        for _ in range(40):
            prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
            fast, rule = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
            assert fast._stream is not None
            rule._stream = None
            assert [fast.add(t) for t in ids] + [fast.flush()] == [rule.add(t) for t in ids] + [rule.flush()], (prompt, ids)
