"""The Prefill gRPC service: compute a prompt's K/V, push it to the decode worker named in the request."""
from __future__ import annotations

import os
import threading
import time

import grpc

from baton import faults, grpc_util
from baton.device_thread import DeviceThread
from baton.engine import PrefillOutput, Prefiller
from baton.errors import Cancelled, DecodeUnreachable, InvalidArgument
from baton.kv_codec import KVDamaged, checksum, dtype_name, encode, wire_bytes
from baton.request import Request
from baton.sampling import SamplingParams
from baton.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from baton.wire import logprobs_to_pb, params_from_pb, params_to_pb
from prefill_service.worker import PrefillWorker

SERVICE = "baton.v1.Prefill"
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


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker):
        self.worker = worker

    @grpc_util.rpc
    def Prefill(self, request, context):
        faults.injector().check_call("prefill_fail")
        if not request.decode_address:
            raise InvalidArgument("decode_address must name the decode worker (host:port)")
        params = params_from_pb(request.params)
        req = Request(request.request_id, list(request.prompt_token_ids), params,
                      output_ids=list(request.generated_token_ids))
        # The router cancels this call when its client goes away or a worker is marked dead: the
        # push stops then, not at its own deadline (add_callback runs when the call ends, however).
        answered = threading.Event()
        context.add_callback(lambda: answered.is_set() or self.worker.cancel_transfer(req.request_id,
                                                                                      request.decode_address))
        try:
            r = self.worker.prefill(req, request.decode_address, request.attempt)
        except grpc.RpcError as e:  # the decode side refused or failed: say which side
            code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNAVAILABLE
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise DecodeUnreachable(f"decode worker {request.decode_address} unreachable: {code.name}") from None
            raise
        finally:
            answered.set()
        return prefill_pb2.PrefillResponse(first_token=r.first_token, num_tokens=r.num_tokens, kv_bytes=r.kv_bytes,
                                           compute_s=r.compute_s, transfer_s=r.transfer_s)

    @grpc_util.rpc
    def Abort(self, request, context):
        return prefill_pb2.AbortResponse(found=self.worker.abort(request.request_id, request.attempt))

    @grpc_util.rpc
    def Stats(self, request, context):
        s = self.worker.stats
        return prefill_pb2.WorkerStatsResponse(running=self.worker.load, kv_transfers=s["prefills"],
                                               kv_bytes=s["kv_bytes"], kv_transfer_s=s["transfer_s"],
                                               completed=s["prefills"], pid=os.getpid(),
                                               faults_fired=faults.injector().counts())


def prefill_worker(prefiller: Prefiller, max_len: int, *, auth_token=None, tls_cert=None, tls_key=None,
                   tls_root_cert=None, transfer_timeout_s: float = 30.0, compute=None) -> PrefillWorker:
    """A PrefillWorker that pushes K/V over gRPC. It presents its own certificate to decode
    workers, which matters when they demand one (mutual TLS). `compute` runs the model on the
    process's model thread (default: the calling thread)."""
    return PrefillWorker(prefiller, max_len, KVPusher(auth_token, tls_root_cert, tls_cert, tls_key), transfer_timeout_s,
                         compute=compute)


def add_servicer(worker, server) -> None:
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(worker), server)


def serve(prefiller: Prefiller, max_len: int, host: str = "127.0.0.1", port: int = 0, *, auth_token=None,
          tls_cert=None, tls_key=None, tls_root_cert=None, tls_client_ca=None, transfer_timeout_s: float = 30.0,
          device: DeviceThread | None = None, max_queue: int = 256):
    """Warm up, start the Prefill service; returns (server, port). `device`: the thread that loaded
    the model, which then runs every prefill (baton/device_thread.py). `max_queue`: the Prefill calls
    it expects to hold at once (each keeps a gRPC thread until its K/V is pushed)."""
    run = device.run if device else (lambda fn, *a: fn(*a))
    run(prefiller.prefill, [1, 2, 3], SamplingParams(max_new_tokens=1))  # warm-up: health means it can compute
    worker = prefill_worker(prefiller, max_len, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                            tls_root_cert=tls_root_cert, transfer_timeout_s=transfer_timeout_s,
                            compute=lambda reqs: run(prefiller.prefill_many, reqs))
    server, bound = grpc_util.make_server(host, port, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
                                          tls_client_ca=tls_client_ca,
                                          max_workers=grpc_util.worker_threads(0, max_queue))
    add_servicer(worker, server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE])
    server.start()
    grpc_util.set_health(health, [SERVICE], True)
    return server, bound
