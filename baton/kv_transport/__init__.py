"""K/V transports, by the name `--kv-transport` takes: how a prompt's K/V moves from a prefill
worker to a decode worker (base.py says what a transport is; control stays on gRPC for all).

- grpc: raw bytes in chunks of the TransferKV stream (grpc.py). Works everywhere.
- nixl: the decode worker reads the prefill worker's registered memory with NIXL over UCX (nixl.py):
  shared memory or TCP between hosts' DRAM, NVLink or RDMA between GPUs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # no torch for a process that only parses flags
    from baton.kv_transport.base import Receiver, Transport

TRANSPORTS = ("grpc", "nixl")
DEFAULT = "grpc"


class TransportUnavailable(RuntimeError):
    """The transport asked for cannot run on this machine (said at start; never a silent fallback)."""


def check(name: str) -> None:
    """Refuse, with the reason, a transport this process cannot run."""
    if name not in TRANSPORTS:
        raise TransportUnavailable(f"--kv-transport must be one of {', '.join(TRANSPORTS)}, got {name!r}")
    if name == "nixl":
        from baton.kv_transport.nixl import load_nixl
        load_nixl()


def sending(name: str, agent_name: str, host: str = "127.0.0.1") -> Transport:
    """The sending side of transport `name` for one prefill worker process."""
    check(name)
    if name == "nixl":
        from baton.kv_transport.nixl import NixlTransport
        return NixlTransport(agent_name, host)
    from baton.kv_transport.grpc import GrpcTransport
    return GrpcTransport()


def receiving(name: str, max_bytes: int, device, agent_name: str, host: str = "127.0.0.1") -> dict[str, Receiver]:
    """The receiving sides a decode worker runs for `--kv-transport name`, by the transport a header
    names: grpc always (a sender may lack NIXL), nixl too when asked for."""
    check(name)
    from baton.kv_transport.grpc import GrpcReceiver
    receivers: dict[str, Receiver] = {"grpc": GrpcReceiver(max_bytes)}
    if name == "nixl":
        from baton.kv_transport.nixl import NixlReceiver
        receivers["nixl"] = NixlReceiver(agent_name, max_bytes, device, host)
    return receivers


def add_arg(p) -> None:
    """--kv-transport, of a worker and of `baton up` (which passes it to every worker)."""
    p.add_argument("--kv-transport", default=DEFAULT, choices=TRANSPORTS,
                   help="how K/V moves from prefill to decode workers: grpc (raw bytes in the gRPC stream, works "
                        "everywhere) or nixl (NIXL over UCX: shared memory, TCP, NVLink or RDMA; refused at start "
                        "where NIXL cannot load). Control stays on gRPC either way (default: %(default)s)")


def agent_name(worker_id: str, side: str) -> str:
    """A NIXL agent name no other process shares (a restarted worker may keep its id)."""
    import os
    import uuid
    return f"{worker_id}-{side}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
