"""The NIXL transport: the decode worker reads the prompt's K/V straight out of the prefill worker's
memory with one NIXL READ over UCX (shared memory or TCP between hosts' DRAM, NVLink/cuda_ipc or
RDMA between GPUs). Control stays on gRPC (base.py): the TransferKV header carries, instead of
data chunks, a NixlSource: the prefill agent's partial metadata (its connection info and the one
registered region) and the region's address and length.

Why the decode side pulls (as vLLM's NixlConnector does) rather than the prefill side writing
(as SGLang does):
- the receiver decides before any byte moves: it checks the header (shape, dtype, an aborted id,
  its queue) and only then reads; a refusal costs no transfer and no memory on its side;
- no extra round trip: a WRITE needs the destination's address first (a second control message);
  a READ needs only what the one TransferKV header already carries, so the call's answer is also
  the completion the prefill worker waits for;
- one owner per side: the prefill worker lends its region until the reader lets go, the decode
  worker owns where the bytes land.

Memory. The prefill worker registers the prefill's own K/V tensor (no copy) for the span of one
transfer. The decode worker reads into a staging buffer from a pool registered once
(staging.py; pages already touched: a read into fresh pages pays their faults inside the copy and
ran 2-5x slower here); the batch's insert copies it into the cache and, once nothing refers to the buffer any more
(its storage's use count, so no view of it can outlive a reuse), it serves the next transfer.
The cache rows themselves are not registered yet: the batch cache is allocated once (its address
is fixed), but which row and which columns a request takes is decided on the engine's thread when
it joins, after the transfer, and the columns move when the window is compacted; reading straight
into a row would need the row reserved when the header arrives.

Freeing, the rule that keeps a reader off freed memory (vllm#21570): the prefill worker frees a
lent region when its TransferKV call ends with an answer from the decode worker's handler (OK or a
refusal: the handler released its read before answering), or, when the call ended otherwise
(cancelled, deadline, connection lost), on the decode worker's `released:<transfer_id>`
notification, sent after its read is released whatever the outcome, or at the latest after
RELEASE_GRACE_S (a reader that died sends none). The decode worker polls its read's state with
short sleeps, never past the call's deadline, and abandons it as soon as the call is cancelled;
it hands on what it read only while the call is still alive (so the region was still lent), and a
failed or abandoned read's buffer goes back to the pool and is never handed on. One transfer is
one READ of one contiguous region: no Python loop per chunk.

Progress. NIXL's Python agent starts UCX's progress thread with a poll timeout of 0 (its
`pthrDelay` is fixed at 0), a thread that spins a core for the agent's whole life: an idle agent
used 3.0 s of CPU in 3 s here, the core a CPU engine's step needs. So the agents run without it and
baton progresses UCX itself, only while a transfer is on: the reader in the loop that polls its
read's state, the lender in its reaper every PROGRESS_S while it lends a region (over shared memory
or cma a READ needs nothing of the lender, over TCP the lender's progress serves it).

By default, on a worker bound to loopback, UCX uses only the loopback network device
(UCX_NET_DEVICES=lo unless set), so nothing listens beyond the machine.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from baton.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from baton.kv_transport.base import Outgoing, Receiver, Transport, expected_nbytes
from baton.kv_transport.staging import POOL_BYTES, StagingPool

log = logging.getLogger(__name__)
RELEASE_GRACE_S = 2.0          # a lent region whose reader never said it let go is freed after this
PREFIX = b"released:"
PROGRESS_S = 0.0005            # how often a lender progresses UCX (and takes notifications) while it lends
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@functools.cache
def load_nixl():
    """The nixl module, or TransportUnavailable saying why it cannot be used here."""
    from baton.kv_transport import TransportUnavailable
    errors = []
    for name in ("nixl_cu13", "nixl_cu12", "nixl"):
        try:
            module = __import__(name)
            module.nixl_agent     # noqa: B018 (the meta-package "nixl" without a backend has none)
            return module
        except Exception as e:    # ImportError, or a shared library that will not load
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise TransportUnavailable("--kv-transport nixl: NIXL cannot be loaded on this machine ("
                               + "; ".join(errors) + "); install it with `make install` (nixl-cu13) "
                               "or start the workers with --kv-transport grpc")


def make_agent(name: str, host: str):
    """A NIXL agent with the UCX backend, its calls serialised (several gRPC threads share it)."""
    from baton.kv_transport import TransportUnavailable
    nixl = load_nixl()
    if host in LOOPBACK:
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
    try:
        config = nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"],   # see Progress above
                                        sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        agent = nixl.nixl_agent(name, config)
    except Exception as e:
        raise TransportUnavailable(f"--kv-transport nixl: no NIXL agent with UCX here: {type(e).__name__}: {e}") from e
    if "UCX" not in agent.backends:
        raise TransportUnavailable(f"--kv-transport nixl: NIXL has no UCX backend here (plugins: {agent.plugin_list})")
    return agent


def _mem(t: torch.Tensor) -> tuple[str, int]:
    """NIXL's memory type and device id of a tensor."""
    return ("VRAM", t.get_device()) if t.is_cuda else ("DRAM", 0)


# ---- sending side (prefill worker) ---------------------------------------------------------------

@dataclass
class _Lent:
    kv: torch.Tensor              # kept alive while lent
    reg: object                   # its registration
    nbytes: int
    free_by: float | None = None  # set when the call ended without an answer: free at the latest then
    released: bool = False        # the reader said it let go (its notification may beat the call's end)
    unanswered: bool = False      # the call ended without the reader's answer


class NixlTransport(Transport):
    name = "nixl"

    def __init__(self, agent_name: str, host: str = "127.0.0.1", release_grace_s: float = RELEASE_GRACE_S):
        self.agent = make_agent(agent_name, host)
        self.agent_name, self.release_grace_s = agent_name, release_grace_s
        self.lent: dict[str, _Lent] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.reaper = threading.Thread(target=self._reap, name="nixl-release", daemon=True)
        self.reaper.start()

    def prepare(self, header, kv: torch.Tensor) -> Outgoing:
        kv = kv.detach().contiguous()                     # (L, 2, Hkv, P, D), lent as it is
        nbytes, (mem_type, device_id) = kv.numel() * kv.element_size(), _mem(kv)
        tid = uuid.uuid4().hex
        with self.cond:
            if self.closed:
                raise Unavailable("the NIXL transport is closed (the worker is stopping)")
            reg = self.agent.register_memory(kv)
            metadata = self.agent.get_partial_agent_metadata(reg, True)
            self.lent[tid] = _Lent(kv, reg, nbytes)
            self.cond.notify_all()                        # the reaper progresses UCX while it lends
        header.nbytes = nbytes
        header.nixl.agent, header.nixl.metadata, header.nixl.transfer_id = self.agent_name, metadata, tid
        header.nixl.address, header.nixl.nbytes = kv.data_ptr(), nbytes
        header.nixl.mem_type, header.nixl.device_id = mem_type, device_id
        return Outgoing(lambda: (), lambda clean: self._finish(tid, clean))

    def _finish(self, tid: str, clean: bool) -> None:
        with self.cond:   # the reaper deregisters (it can take milliseconds): not on the request's path
            if tid in self.lent:
                lent = self.lent[tid]
                lent.unanswered = not clean
                lent.free_by = time.monotonic() + (0.0 if clean or lent.released else self.release_grace_s)
                self.cond.notify_all()

    def _free(self, tid: str) -> None:
        """Under self.cond."""
        lent = self.lent.pop(tid, None)
        if lent is not None:
            self.agent.deregister_memory(lent.reg)

    def _reap(self) -> None:
        """Progresses UCX while a region is lent; frees regions whose reader let go (its notification)
        or whose grace ran out; drains the notifications of transfers already freed, so they do not
        pile up."""
        while True:
            with self.cond:
                self.cond.wait(PROGRESS_S if self.lent else 0.5)
                if self.closed:
                    return
                for msgs in self.agent.get_new_notifs().values():
                    for m in msgs:
                        lent = self.lent.get(tid := m[len(PREFIX):].decode()) if m.startswith(PREFIX) else None
                        if lent is not None and lent.free_by is not None:
                            self._free(tid)
                        elif lent is not None:
                            lent.released = True
                now = time.monotonic()
                for tid in [t for t, x in self.lent.items() if x.free_by is not None and now >= x.free_by]:
                    if self.lent[tid].unanswered and not self.lent[tid].released:
                        log.warning("NIXL: K/V region %s freed after %.1f s without its reader's release",
                                    tid, self.release_grace_s)
                    self._free(tid)

    def held_bytes(self) -> int:
        with self.cond:
            return sum(x.nbytes for x in self.lent.values())

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for tid in list(self.lent):
                self._free(tid)
            self.cond.notify_all()
        self.reaper.join(2)


# ---- receiving side (decode worker) --------------------------------------------------------------

class NixlReceiver(Receiver):
    name = "nixl"

    def __init__(self, agent_name: str, max_bytes: int, device, host: str = "127.0.0.1",
                 pool_bytes: int = POOL_BYTES):
        self.agent = make_agent(agent_name, host)
        self.max_bytes, self.lock = max_bytes, threading.Lock()
        self.pool = StagingPool(self.agent, self.lock, device, pool_bytes)
        self.retired: list[torch.Tensor] = []   # buffers a read may still write into: kept busy for good

    def receive(self, header, frames: Iterator[bytes], dtype: torch.dtype, shape: tuple[int, ...],
                deadline: float, alive: Callable[[], bool]) -> torch.Tensor:
        src = header.nixl
        nbytes = expected_nbytes(dtype, shape, src.nbytes, self.max_bytes)
        if src.mem_type not in ("DRAM", "VRAM") or not src.address or not src.transfer_id:
            raise InvalidArgument("a NIXL source needs an address, a transfer id and mem_type DRAM or VRAM")
        with self.lock:
            try:
                remote = self.agent.add_remote_agent(src.metadata)
            except Exception as e:
                raise InvalidArgument(f"NIXL agent metadata of {src.agent!r} cannot be loaded: {e}") from None
        # No frame an exception's traceback keeps may hold the buffer: it goes back to the pool at once.
        buf = None
        try:
            if not alive():
                raise Cancelled(f"K/V transfer from {src.agent} cancelled before its read")
            buf, done = self.pool.take(nbytes)
            with self.lock:
                local = self.agent.get_xfer_descs(buf)
            stuck: list[bool] = []
            try:
                self._read(local, src, remote, nbytes, deadline, alive, stuck)
            finally:
                if stuck:   # a read that could not be cancelled may still write into it: never reuse it
                    self.retired.append(buf)
                done()
        except BaseException:
            buf = None
            raise
        finally:   # whatever happened, this worker reads no more of it: the sender may free it
            with self.lock:
                try:
                    self.agent.send_notif(remote, PREFIX + src.transfer_id.encode())
                except Exception as e:   # the sender went away: its grace frees the region
                    log.info("NIXL: no release notification to %s: %s", src.agent, e)
        try:
            for _ in frames:
                raise InvalidArgument("no data chunks may follow a header with a NIXL source")
            if not alive():   # the sender's call is over, so its region may be gone: what was read is not trusted
                raise Cancelled(f"K/V transfer from {src.agent} ended before its read was taken")
        except BaseException:   # the call ended badly after the read (cancelled, deadline)
            buf = None
            raise
        return buf.view(dtype).view(shape)

    def _read(self, local, src, remote, nbytes: int, deadline: float, alive: Callable[[], bool],
              stuck: list[bool]) -> None:
        """One READ of the whole region into the local descriptors; polls its state in growing sleeps
        (50 us to 1 ms). Raises if it failed or was abandoned; appends to `stuck` if its handle could
        not be released (the read may go on)."""
        with self.lock:
            far = self.agent.get_xfer_descs([(src.address, nbytes, src.device_id)], src.mem_type)
            handle = self.agent.initialize_xfer("READ", local, far, remote)
        try:
            with self.lock:
                state = self.agent.transfer(handle)
            nap = 50e-6
            while state == "PROC":
                if not alive():
                    raise Cancelled(f"K/V read from {src.agent} cancelled")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"K/V read from {src.agent} not done by the transfer's deadline")
                time.sleep(nap)
                nap = min(nap * 2, 1e-3)
                with self.lock:
                    state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise Unavailable(f"K/V read from {src.agent} failed ({state})")
        finally:
            with self.lock:
                try:
                    self.agent.release_xfer_handle(handle)   # cancels a read still in flight
                except Exception as e:
                    log.error("NIXL: a read from %s could not be cancelled (%s); its staging buffer is retired",
                              src.agent, e)
                    stuck.append(True)

    def held_bytes(self) -> int:
        return self.pool.held_bytes()

    def close(self) -> None:
        self.pool.close()
