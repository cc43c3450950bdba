"""The gRPC transport: the K/V's raw bytes (baton/kv_codec.py) in 1 MiB data chunks that follow the
header in the same Decode.TransferKV stream, checked by length and crc32 on arrival. Works
everywhere; every byte passes through Python and host memory on both sides."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from baton.kv_codec import KVAssembler, checksum, encode, wire_bytes
from baton.kv_transport.base import Outgoing, Receiver, Transport


class GrpcTransport(Transport):
    name = "grpc"

    def prepare(self, header, kv: torch.Tensor) -> Outgoing:
        data = wire_bytes(kv)          # one copy to host memory at most
        header.nbytes, header.crc32 = len(data), checksum(data)
        return Outgoing(lambda: encode(data))


class GrpcReceiver(Receiver):
    name = "grpc"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def receive(self, header, frames: Iterator[bytes], dtype: torch.dtype, shape: tuple[int, ...],
                deadline: float, alive: Callable[[], bool]) -> torch.Tensor:
        asm = KVAssembler(header.dtype, list(shape), header.nbytes, self.max_bytes,
                          header.crc32 if header.HasField("crc32") else None)
        for data in frames:     # the call's own deadline and cancellation end this iteration
            asm.add(data)
        return asm.tensor()
