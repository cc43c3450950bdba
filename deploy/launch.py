"""One local cluster launcher (tests, benchmarks, docs): a router, then its workers all at once.

Workers print BATON_READY only once registered with the router, so when `local_cluster` yields,
the router knows every worker it started."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from deploy.procs import Proc, start_all, stop_all


@dataclass
class Cluster:
    router: Proc
    prefill: list[Proc] = field(default_factory=list)
    decode: list[Proc] = field(default_factory=list)     # decode and colocated workers

    @property
    def procs(self) -> list[Proc]:
        return [self.router, *self.prefill, *self.decode]


def pools(prefill: int = 1, decode: int = 1, colocated: int = 0, flags: list[str] | tuple = ()) -> list[list[str]]:
    """Worker command lines: `colocated` > 0 replaces the prefill and decode pools."""
    if colocated:
        return [["decode_service", "--colocated", *flags] for _ in range(colocated)]
    return [["prefill_service", *flags] for _ in range(prefill)] + [["decode_service", *flags] for _ in range(decode)]


@contextlib.contextmanager
def local_cluster(model: str, workers: list[list[str]], router_args=(), env: dict | None = None,
                  ready_timeout: float = 120.0) -> Iterator[Cluster]:
    """`workers`: one `[module, flags...]` per worker (see pools()); each also gets a free port,
    the model and the router's address. Stops workers, then the router, however the block ends."""
    router = Proc(["router", "--port", "0", "--model", model, *router_args], env=env, ready_timeout=ready_timeout)
    started: list[Proc] = []
    try:
        common = ["--port", "0", "--model", model, "--router", router.address]
        started = start_all([[argv[0], *common, *argv[1:]] for argv in workers], env, ready_timeout)
        yield Cluster(router, [p for p in started if p.args[0] == "prefill_service"],
                      [p for p in started if p.args[0] == "decode_service"])
    finally:
        stop_all(started)   # before the router, so that they deregister from a live one
        router.stop()
