"""The baton.v1.Router service: validate, admit, then hand the request to a RequestRun
(router/request_run.py: pick workers, prefill with retry, relay tokens, migrate, settle).
Stats, Status, Scale and worker registration are the admin side."""
from __future__ import annotations

import logging
import uuid

import grpc

from baton import grpc_util
from baton.errors import FailedPrecondition, InvalidArgument
from baton.model_files import encode_prompt
from baton.sampling import SamplingParams
from baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from baton.wire import sampling_from_request
from router import metrics
from router.books import Books
from router.config import RouterConfig
from router.follow_link import FollowLinks
from router.limits import Limits, check_prompt, check_prompt_chars, check_request_id, validate_sampling
from router.liveness import LivenessWatcher
from router.registry import ChannelClosed, Registry, decode_context, max_batch, worker_stats
from router.request_run import RequestRun

log = logging.getLogger(__name__)
SERVICE = "baton.v1.Router"
__all__ = ["SERVICE", "RouterConfig", "RouterServicer"]


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, registry: Registry, tokenizer, context_len: int, model_name: str,
                 config: RouterConfig = RouterConfig(), limits: Limits = Limits(), scaler=None):
        self.registry, self.tokenizer, self.context_len = registry, tokenizer, context_len
        self.model_name, self.config, self.limits = model_name, config, limits.for_context(context_len)
        self.scaler = scaler                  # callable(role, count) -> count, from the deployment
        self.api_servers = lambda: []         # callable() -> [router_pb2.ApiServer]: baton up sets it
        self.auth = grpc_util.auth_metadata(config.auth_token)
        self.books = Books(config.max_queue, config.max_running)
        self.links = FollowLinks(self.auth, config.keepalive_s)   # one token stream per decode worker
        self.liveness = LivenessWatcher()
        self.liveness.start()

    # ---- Generate -------------------------------------------------------------------------
    def _parse(self, r: router_pb2.GenerateRequest) -> tuple[str, list[int], SamplingParams]:
        rid = r.request_id or uuid.uuid4().hex
        check_request_id(self.limits, rid)
        ids = self._prompt_ids(r)
        # Left unset, max_new_tokens is what the context leaves (at most --max-new-tokens).
        context = decode_context(self.registry.live("decode"), self.context_len)
        left = max(1, min(self.limits.max_new_tokens, context - len(ids)))
        default = self.config.default_max_new_tokens or left
        # The token ids of logit_bias are checked against the model's vocabulary by the workers.
        params = sampling_from_request(r, validate_sampling(self.limits, r, default))
        check_prompt(self.limits, len(ids), params.max_new_tokens, context)
        return rid, ids, params

    def _prompt_ids(self, r: router_pb2.GenerateRequest) -> list[int]:
        if r.prompt_token_ids:
            ids = list(r.prompt_token_ids)
            # Without a tokenizer the prefill worker checks ids against the model's vocabulary.
            if self.tokenizer is not None and max(ids) >= len(self.tokenizer):
                raise InvalidArgument(f"prompt_token_ids must be in [0, {len(self.tokenizer)})", field="prompt_token_ids")
            return ids
        check_prompt_chars(self.limits, r.prompt)
        if not r.prompt.strip():
            raise InvalidArgument("prompt must not be empty", field="prompt")
        if self.tokenizer is None:
            raise InvalidArgument("this model has no tokenizer: send prompt_token_ids", field="prompt")
        return encode_prompt(self.tokenizer, r.prompt, r.raw)

    @grpc_util.rpc
    def Generate(self, request, context):
        yield from self.generate(request, context)

    def generate(self, request, context, counted: bool = True):
        """A request's stream. `counted=False` (the router's start-up warm-up, router/health.py): it
        runs like any other but counts in no book and no metric."""
        rid, ids, params = self._parse(request)
        self.books.admit(rid)
        metrics.claim(rid)   # from now on this process's router, not a gateway beside it, observes it
        run = RequestRun(rid, ids, params, context, registry=self.registry, config=self.config, books=self.books,
                         auth=self.auth, links=self.links, counted=counted)
        if not context.add_callback(run.settle):
            run.settle()
            return
        self.liveness.watch(run)
        try:
            yield from run.relay()
        except Exception as e:  # the rpc decorator turns it into a status code; settle counts it failed
            run.error = e
            log.info("request %s ended: %s %s", rid, getattr(e, "code_name", type(e).__name__), e)
            raise
        finally:
            self.liveness.forget(run)

    # ---- Stats / admin ------------------------------------------------------------------------
    def stats_pb(self) -> router_pb2.StatsResponse:
        running, waiting, c = self.books.snapshot()  # one snapshot: running/waiting and outcomes agree
        return router_pb2.StatsResponse(
            running=running, waiting=waiting, prefill_workers=len(self.registry.live("prefill")),
            decode_workers=len(self.registry.live("decode")), completed=c["completed"], failed=c["failed"],
            cancelled=c["cancelled"], rejected=c["rejected"], prefill_retries=c["prefill_retries"],
            migrations=c["migrations"], kv_bytes=c["kv_bytes"])

    @grpc_util.rpc
    def Stats(self, request, context):
        return self.stats_pb()

    @grpc_util.rpc
    def Status(self, request, context):
        with self.registry.lock:
            handles = list(self.registry.workers.values())
        for w in handles:
            self._refresh_stats(w, timeout_s=1)
        return router_pb2.StatusResponse(workers=[w.to_pb() for w in handles], stats=self.stats_pb(),
                                         max_batch=max_batch(handles), max_queue=self.config.max_queue,
                                         model=self.model_name, topology=self.registry.topology(),
                                         max_model_len=decode_context(self.registry.live("decode"), self.context_len),
                                         api_servers=self.api_servers())

    @grpc_util.rpc
    def Scale(self, request, context):
        if request.role not in ("prefill", "decode", "colocated"):
            raise InvalidArgument(f"role must be 'prefill', 'decode' or 'colocated', got {request.role!r}")
        if not 1 <= request.count <= 64:
            raise InvalidArgument(f"count must be in [1, 64], got {request.count}")
        if self.scaler is None:
            raise FailedPrecondition("scaling needs a deployment that can start workers (baton up)")
        return router_pb2.ScaleResponse(count=self.scaler(request.role, request.count))

    @grpc_util.rpc
    def RegisterWorker(self, request, context):
        w = self.registry.register(request.worker)
        if not w.stats:   # what it holds (its context among it) is known from its first request on
            self._refresh_stats(w, timeout_s=2)
        return router_pb2.RegisterWorkerResponse()

    def _refresh_stats(self, w, timeout_s: float) -> None:
        """The worker's current Stats kept on its handle (the last ones stay if it does not answer)."""
        try:
            w.stats = worker_stats(w.stub.Stats(common_pb2.WorkerStatsRequest(), timeout=timeout_s, metadata=self.auth))
        except (grpc.RpcError, ChannelClosed):
            pass

    @grpc_util.rpc
    def DeregisterWorker(self, request, context):
        self.registry.deregister(request.worker_id)
        return router_pb2.DeregisterWorkerResponse()
