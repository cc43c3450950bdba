"""K/V on the wire: raw tensor bytes in chunks under the gRPC message limit, never pickle.

The sender gives a header (dtype name, shape, nbytes, crc32 of the bytes) and then the bytes in
order; the receiver checks every field against its limits before it allocates, fills one buffer,
and refuses bytes that are too many, too few or do not match the checksum (KVDamaged).
bfloat16 has no numpy dtype, so tensors travel as their bytes and are viewed back.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch

from baton.errors import KVCodecError  # noqa: F401 (re-exported: callers catch it from here)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 1 << 20   # 1 MiB: well under gRPC's 4 MiB default message limit
DAMAGED = "K/V damaged in transit"   # opens every KVDamaged message (callers act on its reason)


class KVDamaged(KVCodecError):
    """The bytes that arrived are not the ones sent (too many, too few, checksum): a resend may pass."""
    reason = "kv-damaged"

    def __init__(self, why: str):
        super().__init__(f"{DAMAGED}: {why}")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise KVCodecError(f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    return DTYPE_NAMES[dtype]


def wire_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C order, on the CPU; one copy at most."""
    dtype_name(tensor.dtype)
    return memoryview(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())


def checksum(data: memoryview | bytes, running: int = 0) -> int:
    """crc32 of the bytes, continuing `running` (the checksum of the bytes before them)."""
    return zlib.crc32(data, running)


def encode(tensor: torch.Tensor | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The tensor's bytes (or wire_bytes already taken) in chunks of at most chunk_bytes."""
    data = tensor if isinstance(tensor, memoryview) else wire_bytes(tensor)
    for off in range(0, len(data), chunk_bytes):
        yield data[off:off + chunk_bytes]


class KVAssembler:
    """Receives the chunks of one tensor and checks them; `tensor()` once all bytes are in."""

    def __init__(self, dtype: str, shape: list[int] | tuple[int, ...], nbytes: int, max_bytes: int,
                 crc32: int | None = None):
        if dtype not in DTYPES:
            raise KVCodecError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not shape or any(d <= 0 for d in shape):
            raise KVCodecError(f"shape must be non-empty with positive dimensions, got {list(shape)}")
        self.dtype, self.shape = DTYPES[dtype], tuple(int(d) for d in shape)
        expected = math.prod(self.shape) * self.dtype.itemsize
        if nbytes != expected:
            raise KVCodecError(f"nbytes {nbytes} does not match shape {list(shape)} of {dtype} ({expected} bytes)")
        if nbytes > max_bytes:
            raise KVCodecError(f"K/V of {nbytes} bytes is over the limit of {max_bytes}")
        self.buf = bytearray(nbytes)
        self.filled = 0
        self.crc32, self.running_crc = crc32, 0   # None: the sender gave no checksum

    def add(self, data: bytes) -> None:
        end = self.filled + len(data)
        if end > len(self.buf):
            raise KVDamaged(f"more K/V bytes than the header's {len(self.buf)}")
        self.buf[self.filled:end] = data
        self.filled = end
        if self.crc32 is not None:
            self.running_crc = checksum(data, self.running_crc)

    def tensor(self) -> torch.Tensor:
        if self.filled != len(self.buf):
            raise KVDamaged(f"K/V truncated: got {self.filled} of {len(self.buf)} bytes")
        if self.crc32 is not None and self.running_crc != self.crc32:
            raise KVDamaged(f"crc32 {self.running_crc:08x} of the bytes does not match the header's {self.crc32:08x}")
        return torch.frombuffer(self.buf, dtype=torch.uint8).view(self.dtype).view(self.shape)
