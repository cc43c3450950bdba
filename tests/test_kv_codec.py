import pytest
import torch

from baton.kv_codec import CHUNK_BYTES, KVAssembler, KVCodecError, dtype_name, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_preserves_dtype_and_values(dtype):
    t = torch.randn(3, 2, 2, 37, 8).to(dtype)
    chunks = list(encode(t, chunk_bytes=1000))
    assert all(len(c) <= 1000 for c in chunks)
    a = KVAssembler(dtype_name(dtype), list(t.shape), t.numel() * t.element_size(), max_bytes=1 << 30)
    for c in chunks:
        a.add(bytes(c))
    out = a.tensor()
    assert out.dtype == dtype and torch.equal(out, t)


def test_default_chunks_stay_under_grpc_limit():
    t = torch.zeros(5 * CHUNK_BYTES // 4 + 3, dtype=torch.float32)
    assert max(len(c) for c in encode(t)) <= CHUNK_BYTES < 4 * 1024 * 1024


@pytest.mark.parametrize("dtype, shape, nbytes, match", [
    ("int8", [2, 2], 4, "dtype"), ("float32", [2, 0], 0, "shape"), ("float32", [], 0, "shape"),
    ("float32", [2, 2], 15, "nbytes"), ("float64", [1 << 20, 1 << 10], 8 << 30, "limit")])
def test_bad_headers(dtype, shape, nbytes, match):
    with pytest.raises(KVCodecError, match=match):
        KVAssembler(dtype, shape, nbytes, max_bytes=1 << 30)


def test_truncated_and_overlong():
    a = KVAssembler("float32", [4], 16, max_bytes=1024)
    a.add(b"\0" * 8)
    with pytest.raises(KVCodecError, match="truncated"):
        a.tensor()
    with pytest.raises(KVCodecError, match="more"):
        a.add(b"\0" * 9)
