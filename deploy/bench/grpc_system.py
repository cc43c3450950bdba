"""`baton_grpc`: the workload through a router and worker processes over gRPC (loopback), each
query a client stream opened at its arrival time. Topology `disaggregated`: a prefill and a
decode worker (optionally pinned each to its own cores, two devices emulated on one CPU);
`colocated`: one worker serving both roles on every core."""
from __future__ import annotations

import os
import threading
import time

from deploy.launch import local_cluster
from deploy.bench.systems import RunResult


class BatonGrpcSystem:
    name = "baton_grpc"

    def __init__(self, model_name: str, dtype: str, max_batch: int, prefill_threads: int = 1,
                 decode_threads: int | None = None, topology: str = "disaggregated", device: str = "auto",
                 pin: bool = False):
        self.model_name, self.dtype, self.max_batch = model_name, dtype, max_batch
        self.topology, self.device, self.pin = topology, device, pin
        self.prefill_threads = prefill_threads
        self.decode_threads = decode_threads or max(1, (os.cpu_count() or 2))

    def _workers(self, common: list[str]) -> list[list[str]]:
        cores = list(range(os.cpu_count() or 1))
        if self.topology == "colocated":
            return [["decode_service", "--colocated", *common, "--threads", str(len(cores))]]
        split = max(1, len(cores) // 2)
        pins = (["--cpus", ",".join(map(str, cores[:split]))], ["--cpus", ",".join(map(str, cores[split:]))]) \
            if self.pin and len(cores) > 1 else ([], [])
        return [["prefill_service", *common, "--threads", str(split if self.pin else self.prefill_threads), *pins[0]],
                ["decode_service", *common, "--threads", str(len(cores) - split if self.pin else self.decode_threads),
                 *pins[1]]]

    def run(self, queries, progress=None) -> RunResult:
        from router.client import RouterClient
        flags = ["--dtype", self.dtype, "--max-batch", str(self.max_batch), "--max-queue", "100000",
                 "--log-level", "WARNING", "--device", self.device]
        router_args = ["--max-queue", "100000", "--log-level", "WARNING"]
        with local_cluster(self.model_name, self._workers(flags), router_args) as c, \
                RouterClient(c.router.address) as client:
            client.complete([1, 2, 3], max_new_tokens=2)  # warm: the first request pays for lazy set-up
            return self._replay(client, queries, progress)

    def _replay(self, client, queries, progress) -> RunResult:
        times: dict[int, list[float]] = {q.index: [] for q in queries}
        kv = {"bytes": 0, "seconds": 0.0}
        errors: list[str] = []
        done = [0]
        lock = threading.Lock()
        start = time.monotonic()

        def one(q):
            delay = q.arrival_s - (time.monotonic() - start)
            if delay > 0:
                time.sleep(delay)
            try:
                for r in client.generate(list(q.prompt_ids), max_new_tokens=q.max_new_tokens, ignore_eos=True,
                                         seed=q.index, timeout=3600):
                    now = time.monotonic()
                    times[q.index].extend([now] * len(r.token_ids))
                    if r.finish_reason:
                        with lock:
                            kv["bytes"] += r.kv_bytes
                            kv["seconds"] += r.kv_transfer_s
            except Exception as e:
                errors.append(repr(e))
            with lock:
                done[0] += 1
                if progress:
                    progress(self.name, done[0], len(queries))
        threads = [threading.Thread(target=one, args=(q,), daemon=True) for q in queries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} baton_grpc requests failed, e.g. {errors[0]}")
        return RunResult(times, start, 0.0, {"kv_transfer_bytes": kv["bytes"], "kv_transfer_s": kv["seconds"]})
