"""The K/V transport interface: how a prompt's K/V (L, 2, Hkv, P, D) gets from a prefill worker into
a decode worker, on both sides.

Control and data are apart. Control always rides the gRPC call Decode.TransferKV: its first
message, the KVHeader, says which request, its prompt, params and first token, and what the K/V is
(dtype, shape); the call's deadline bounds the transfer, cancelling the call aborts it, and its
answer says the decode worker has the K/V. prefill_service/kv_push.py (sending) and
DecodeServicer.TransferKV (receiving) own that path for every transport. A transport moves only
the bytes:

- sending (`Transport.prepare`): fills in the header's data part (nbytes and checksum for bytes
  that follow in the stream; a registered region for NIXL), gives the data chunks the call
  carries after the header (none for NIXL), and is told when the call is over, so it frees what
  it held for the transfer exactly once (`Outgoing.finish`).
- receiving (`Receiver.receive`): from the checked header and the chunks that follow, the K/V as
  a tensor of the header's dtype and shape, or an error; it stops when the call is no longer
  alive or its deadline passes, and frees what it took on any failure.

Transports register themselves in baton/kv_transport/__init__.py (`TRANSPORTS`); the header
names the one that carried it (`header_transport`), so a decode worker that has NIXL also takes
K/V sent over gRPC.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from baton.errors import InvalidArgument
from baton.kv_codec import DTYPES


@dataclass
class Outgoing:
    """One transfer's data, as the sending transport prepared it."""
    frames: Callable[[], Iterable[bytes | memoryview]]   # the data chunks after the header, in order,
                                                          # afresh for each send (a resend repeats them)
    finish: Callable[[bool], None] = field(default=lambda clean: None)
    # finish(clean): the call is over. clean: the receiver answered (OK or a refusal of its own),
    # so it reads nothing more; otherwise (cancelled, deadline, connection lost) it may still be
    # reading for a moment, and a transport that lends memory frees it only once that is ruled out.


class Transport(ABC):
    """The sending side of a transport (one per prefill worker process)."""
    name: str

    @abstractmethod
    def prepare(self, header, kv: torch.Tensor) -> Outgoing:
        """Describe the K/V's bytes in `header` (a decode_pb2.KVHeader, control fields already set) and
        return what the call carries and how to free it afterwards."""

    def held_bytes(self) -> int:
        """K/V bytes this transport holds for transfers now (0 once every transfer is over)."""
        return 0

    def close(self) -> None:
        """Release everything (the worker is going)."""


class Receiver(ABC):
    """The receiving side of a transport (one per decode worker process)."""
    name: str

    @abstractmethod
    def receive(self, header, frames: Iterator[bytes], dtype: torch.dtype, shape: tuple[int, ...],
                deadline: float, alive: Callable[[], bool]) -> torch.Tensor:
        """The K/V the header describes, (L, 2, Hkv, P, D) in `dtype`; `frames`: the data chunks the
        call carried after the header. `deadline` (time.monotonic) and `alive` (the call is still
        wanted) bound the wait. Raises a BatonError (refused, damaged, cancelled, timed out)."""

    def held_bytes(self) -> int:
        """K/V bytes received and not yet given up by their user (staging buffers in use)."""
        return 0

    def close(self) -> None:
        """Release everything (the worker is going)."""


def header_transport(header) -> str:
    """The transport a KVHeader's data came by."""
    return "nixl" if header.HasField("nixl") else "grpc"


def expected_nbytes(dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, max_bytes: int) -> int:
    """Check a header's byte count against its shape and the receiver's limit before anything is allocated."""
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise InvalidArgument(f"nbytes {nbytes} does not match shape {list(shape)} of {dtype} ({expected} bytes)")
    if nbytes > max_bytes:
        raise InvalidArgument(f"K/V of {nbytes} bytes is over the limit of {max_bytes}")
    return nbytes


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
