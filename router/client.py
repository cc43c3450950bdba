"""Python client of the baton router.

    from router.client import RouterClient
    with RouterClient("127.0.0.1:50051") as c:
        for chunk in c.generate("What is the capital of France?", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
"""
from __future__ import annotations

from collections.abc import Iterator

from baton import grpc_util
from baton.v1 import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, auth_token: str | None = None,
                 tls_root_cert: str | None = None):
        self.channel = grpc_util.make_channel(address, tls_root_cert=tls_root_cert)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.metadata = grpc_util.auth_metadata(auth_token)

    def __enter__(self) -> "RouterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(self, prompt: str | list[int] = "", *, timeout: float | None = None, **fields):
        """The raw streaming call (cancel it with .cancel()). `prompt` may be token ids."""
        req = router_pb2.GenerateRequest(**fields)
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.extend(prompt)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def generate(self, prompt: str | list[int] = "", *, timeout: float | None = None,
                 **fields) -> Iterator[router_pb2.GenerateResponse]:
        """Stream the completion. Fields (GenerateRequest's): max_new_tokens, temperature, top_p, top_k, min_p, seed,
        stop, raw, ignore_eos, logit_bias ({token_id: bias}), min_tokens, repetition_penalty,
        frequency_penalty, presence_penalty, logprobs (k: each message's `logprobs` has one TokenLogprobs
        per token id), json_schema (a JSON schema the output follows), regex (a regular expression the
        whole output matches), grammar (an EBNF grammar whose root rule the output follows)."""
        yield from self.generate_stream(prompt, timeout=timeout, **fields)

    def complete(self, prompt: str | list[int] = "", **fields) -> tuple[str, list[int], router_pb2.GenerateResponse]:
        """The whole completion: (text, token ids, last message with finish reason and usage)."""
        text, ids, last = [], [], None
        for r in self.generate(prompt, **fields):
            text.append(r.text)
            ids.extend(r.token_ids)
            last = r
        return "".join(text), ids, last

    def stats(self, timeout: float = 5) -> router_pb2.StatsResponse:
        return self.stub.Stats(router_pb2.StatsRequest(), timeout=timeout, metadata=self.metadata)

    def status(self, timeout: float = 10) -> router_pb2.StatusResponse:
        return self.stub.Status(router_pb2.StatusRequest(), timeout=timeout, metadata=self.metadata)

    def scale(self, role: str, count: int, timeout: float = 600) -> int:
        return self.stub.Scale(router_pb2.ScaleRequest(role=role, count=count), timeout=timeout,
                               metadata=self.metadata).count

    def register_worker(self, info: router_pb2.WorkerInfo, timeout: float = 10) -> None:
        self.stub.RegisterWorker(router_pb2.RegisterWorkerRequest(worker=info), timeout=timeout, metadata=self.metadata)

    def deregister_worker(self, worker_id: str, timeout: float = 10) -> None:
        self.stub.DeregisterWorker(router_pb2.DeregisterWorkerRequest(worker_id=worker_id), timeout=timeout,
                                   metadata=self.metadata)
