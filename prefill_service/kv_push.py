"""The sending side of a K/V transfer, its control path: one Decode.TransferKV call per transfer
(header first, with the request's control fields), its deadline, its cancellation and its resends.
The bytes themselves are the transport's (baton/kv_transport/): chunks in the same stream (grpc)
or a region the decode worker reads (nixl). The receiving side is DecodeServicer.TransferKV."""
from __future__ import annotations

import threading
import time

import grpc

from baton import grpc_util
from baton.engine.prefill import PrefillOutput
from baton.errors import Cancelled
from baton.kv_codec import KVDamaged, dtype_name
from baton.kv_transport.base import Transport
from baton.kv_transport.grpc import GrpcTransport
from baton.request import Request
from baton.v1 import decode_pb2, decode_pb2_grpc
from baton.wire import logprobs_to_pb, params_to_pb

RESENDS = 2   # a transfer the decode worker refused as damaged in transit is sent again this often
# Codes only the decode worker's handler gives: it answered, so it reads nothing more of the K/V.
ANSWERED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


def control_header(req: Request, pre: PrefillOutput) -> decode_pb2.KVHeader:
    """The transfer's control part: which request, its prompt, params and first token, the K/V's dtype and shape."""
    kv = pre.kv
    header = decode_pb2.KVHeader(
        request_id=req.request_id, prompt_token_ids=req.prompt_ids, generated_token_ids=req.output_ids,
        next_token=pre.token_id, params=params_to_pb(req.params), dtype=dtype_name(kv.dtype), shape=list(kv.shape),
        attempt=req.attempt)
    if pre.logprobs is not None:
        header.next_token_logprobs.CopyFrom(logprobs_to_pb(pre.logprobs))
    return header


class KVPusher:
    """Sends K/V to decode workers through `transport`, over one cached channel per address."""

    def __init__(self, auth_token: str | None = None, tls_root_cert: str | None = None,
                 tls_client_cert: str | None = None, tls_client_key: str | None = None,
                 transport: Transport | None = None):
        self.transport = transport or GrpcTransport()
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
        t, key = time.monotonic(), (req.request_id, address)
        header = control_header(req, pre)
        out = self.transport.prepare(header, pre.kv)

        def chunks():
            yield decode_pb2.KVChunk(header=header)
            for piece in out.frames():
                yield decode_pb2.KVChunk(data=bytes(piece))
        clean = False
        try:
            for resend in range(RESENDS + 1):
                call = self._stub(address).TransferKV.future(chunks(), timeout=deadline_s, metadata=self.auth)
                with self.lock:
                    self.pushing[key] = call
                try:
                    call.result()
                    clean = True
                    break
                except grpc.FutureCancelledError:
                    raise Cancelled(f"K/V transfer of {req.request_id!r} to {address} cancelled") from None
                except grpc.RpcError as e:  # damaged on the way (the refusal left nothing behind): send again
                    clean = isinstance(e, grpc.Call) and e.code() in ANSWERED
                    if grpc_util.reason(e) != KVDamaged.reason or resend == RESENDS:
                        raise
                finally:
                    with self.lock:
                        self.pushing.pop(key, None)
        finally:
            out.finish(clean)
        return time.monotonic() - t

    def cancel(self, request_id: str, address: str | None = None) -> None:
        """Stop pushing the request's K/V (to `address`, or to any decode worker)."""
        with self.lock:
            calls = [c for (rid, a), c in self.pushing.items() if rid == request_id and address in (None, a)]
        for call in calls:
            call.cancel()

    def close(self) -> None:
        self.transport.close()
