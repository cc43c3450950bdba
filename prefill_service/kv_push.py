"""The sending side of a K/V transfer: a prefill worker's K/V, streamed to a decode worker's
TransferKV (its receiving side, decode_service/worker.py) as raw bytes (baton/kv_codec.py)."""
from __future__ import annotations

import threading
import time

import grpc

from baton import faults, grpc_util
from baton.engine import PrefillOutput
from baton.errors import Cancelled
from baton.kv_codec import KVDamaged, checksum, dtype_name, encode, wire_bytes
from baton.request import Request
from baton.v1 import decode_pb2, decode_pb2_grpc
from baton.wire import logprobs_to_pb, params_to_pb

RESENDS = 2   # a transfer the decode worker refused as damaged in transit is sent again this often


class KVPusher:
    """Sends K/V to decode workers over one cached channel per address."""

    def __init__(self, auth_token: str | None = None, tls_root_cert: str | None = None,
                 tls_client_cert: str | None = None, tls_client_key: str | None = None):
        self.auth = grpc_util.auth_metadata(auth_token)
        self.tls = dict(tls_root_cert=tls_root_cert, tls_client_cert=tls_client_cert, tls_client_key=tls_client_key)
        self.stubs: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self.pushing: dict[tuple[str, str], grpc.Future] = {}   # (request id, decode address) -> TransferKV
        self.lock = threading.Lock()

    def _stub(self, address: str) -> decode_pb2_grpc.DecodeStub:
        with self.lock:
            if address not in self.stubs:
                self.stubs[address] = decode_pb2_grpc.DecodeStub(
                    grpc_util.make_channel(address, keepalive=True, **self.tls))
            return self.stubs[address]

    def __call__(self, address: str, req: Request, pre: PrefillOutput, deadline_s: float) -> float:
        kv, injector = pre.kv, faults.injector()
        deadline_s = injector.transfer_timeout_s or deadline_s
        data = wire_bytes(kv)
        header = decode_pb2.KVHeader(
            request_id=req.request_id, prompt_token_ids=req.prompt_ids, generated_token_ids=req.output_ids,
            next_token=pre.token_id, params=params_to_pb(req.params), dtype=dtype_name(kv.dtype),
            shape=list(kv.shape), nbytes=len(data), crc32=checksum(data))
        if pre.logprobs is not None:
            header.next_token_logprobs.CopyFrom(logprobs_to_pb(pre.logprobs))

        def chunks():
            yield decode_pb2.KVChunk(header=header)
            for piece in injector.kv_chunks(encode(data), deadline_s):
                yield decode_pb2.KVChunk(data=bytes(piece))
        t, key = time.monotonic(), (req.request_id, address)
        for resend in range(RESENDS + 1):
            call = self._stub(address).TransferKV.future(chunks(), timeout=deadline_s, metadata=self.auth)
            with self.lock:
                self.pushing[key] = call
            try:
                call.result()
                break
            except grpc.FutureCancelledError:
                raise Cancelled(f"K/V transfer of {req.request_id!r} to {address} cancelled") from None
            except grpc.RpcError as e:  # damaged on the way (the refusal left nothing behind): send again
                if grpc_util.reason(e) != KVDamaged.reason or resend == RESENDS:
                    raise
            finally:
                with self.lock:
                    self.pushing.pop(key, None)
        return time.monotonic() - t

    def cancel(self, request_id: str, address: str | None = None) -> None:
        """Stop pushing the request's K/V (to `address`, or to any decode worker)."""
        with self.lock:
            calls = [c for (rid, a), c in self.pushing.items() if rid == request_id and address in (None, a)]
        for call in calls:
            call.cancel()
