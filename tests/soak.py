"""`make soak` (not in CI, not collected by pytest): a bounded run of mixed load against a router
with 2 prefill and 2 decode worker processes of the tiny model (float64, 127.0.0.1), while workers
are SIGKILLed (and restarted, so the pool stays up) or SIGSTOPped for a few seconds and resumed.

    SOAK_MINUTES=5 .venv/bin/python tests/soak.py        # or --minutes 5; default 30

Load: CLIENTS client threads, each request one of greedy to the end (tokens compared with
transformers' generate()), greedy cancelled by the client after a few tokens, greedy with a
0.05-0.6 s deadline (tokens compared when it finishes in time) or sampled (temperature 0.8, seeded).
Prints RSS, open fds, threads (/proc/PID) and the K/V and rows of every process at the start and
the end, and the outcome counts. Exits 1 if a greedy request returned OK with wrong tokens, a
request failed with an unclear code, or something leaked once the load stopped: the router's or
a live worker's running / waiting / kv_used_bytes / K/V its transport holds not back to 0 within DRAIN_S, the open fds
of a process that lived through the whole run grown by more than FD_SLACK, or a process listening
beyond loopback (at the start, and at the end with the replaced workers).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from deploy.procs import Proc, wait_for  # noqa: E402
from listening import beyond_loopback, listeners, processes  # noqa: E402
from baton.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc  # noqa: E402
from router.client import RouterClient  # noqa: E402
from tiny_model import EOS, reference_greedy, save_tiny, tiny_llama  # noqa: E402

CLIENTS, NEW, PROMPTS = 6, 16, 32
CHAOS_EVERY_S = (15.0, 25.0)     # one kill or stop this often
STOP_S = (2.0, 8.0)              # how long a SIGSTOPped worker stays stopped
DRAIN_S, FD_SLACK = 90.0, 16
CLEAR = {"CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"}


class Pool:
    """The router and its workers; a killed worker is replaced by a new process of its role."""

    def __init__(self, model_dir: str, kv_transport: str = "grpc"):
        self.router = Proc(["router", "--port", "0", "--model", model_dir])
        self.common = ["--port", "0", "--model", model_dir, "--dtype", "float64", "--router", self.router.address,
                       "--threads", "1", "--max-batch", "8", "--kv-transport", kv_transport]
        self.workers: list[tuple[str, Proc]] = []
        self.lock = threading.Lock()
        self.original: set[int] = {self.router.pid}
        try:
            for role in ("prefill", "prefill", "decode", "decode"):
                self.start(role)
        except BaseException:   # one did not start: stop the router and the workers that did (a run left them)
            self.stop()
            raise
        self.original |= {p.pid for _, p in self.workers}

    def start(self, role: str) -> None:
        p = Proc([f"{role}_service", *self.common])
        with self.lock:
            self.workers.append((role, p))

    def replace(self, role: str, p: Proc) -> None:
        with self.lock:
            self.workers.remove((role, p))
        self.start(role)

    def procs(self) -> list[tuple[str, Proc]]:
        with self.lock:
            return [("router", self.router), *self.workers]

    def stop(self) -> None:
        for _, p in reversed(self.procs()):
            p.signal(signal.SIGCONT)
            p.stop()


def proc_usage(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f)
    return {"rss_mb": int(st["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(st["Threads"])}


def worker_stats(role: str, address: str) -> common_pb2.WorkerStatsResponse | None:
    stub = prefill_pb2_grpc.PrefillStub if role == "prefill" else decode_pb2_grpc.DecodeStub
    with grpc.insecure_channel(address) as ch:
        try:
            return stub(ch).Stats(common_pb2.WorkerStatsRequest(), timeout=5)
        except grpc.RpcError:
            return None


def snapshot(pool: Pool, client: RouterClient, title: str) -> dict[int, dict]:
    """Print and return every process's usage; the router's rows from its Stats, workers' from theirs."""
    print(f"\n{title}\n| process | pid | RSS MB | fds | threads | running | waiting | kv_used_bytes | kv_cache_bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for role, p in pool.procs():
        if p.p.poll() is not None:
            print(f"| {role} | {p.pid} | exited with {p.p.returncode} | | | | | | |")
            continue
        u = proc_usage(p.pid)
        if role == "router":
            s = client.stats()
            rows = (s.running, s.waiting, "-", "-")
        else:
            s = worker_stats(role, p.address)
            rows = (s.running, s.waiting, s.kv_used_bytes, s.kv_cache_bytes) if s else ("?",) * 4
        u["rows"] = rows
        out[p.pid] = u
        print(f"| {role} | {p.pid} | {u['rss_mb']:.1f} | {u['fds']} | {u['threads']} | " + " | ".join(map(str, rows)) + " |")
    return out


class Load:
    def __init__(self, address: str, refs: dict[int, list[int]], prompts: list[list[int]], until: float):
        self.address, self.refs, self.prompts, self.until = address, refs, prompts, until
        self.outcomes: Counter = Counter()
        self.wrong: list[str] = []
        self.lock = threading.Lock()

    def count(self, key: str) -> None:
        with self.lock:
            self.outcomes[key] += 1

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with RouterClient(self.address) as c:
            while time.monotonic() < self.until:
                i = rng.randrange(len(self.prompts))
                kind = rng.choices(["greedy", "cancel", "deadline", "sampled"], [5, 2, 2, 1])[0]
                try:
                    self.one(c, kind, i, rng)
                except grpc.RpcError as e:
                    self.count(f"{kind}: {e.code().name}")

    def one(self, c: RouterClient, kind: str, i: int, rng: random.Random) -> None:
        prompt = self.prompts[i]
        if kind == "sampled":
            _, ids, _ = c.complete(prompt, max_new_tokens=NEW, temperature=0.8, seed=rng.randrange(1 << 30),
                                   ignore_eos=True, timeout=120)
            self.count("sampled: OK" if len(ids) == NEW else "sampled: OK, wrong length")
            return
        timeout = rng.uniform(0.05, 0.6) if kind == "deadline" else 120
        call = c.generate_stream(prompt, max_new_tokens=NEW, ignore_eos=True, timeout=timeout)
        stop_after = rng.randint(1, NEW - 2) if kind == "cancel" else None
        ids = []
        for r in call:
            ids.extend(r.token_ids)
            if stop_after is not None and len(ids) >= stop_after:
                call.cancel()
                self.count("cancel: cancelled by the client")
                return
        if ids == self.refs[i]:
            self.count(f"{kind}: OK, exact")
        else:
            self.count(f"{kind}: OK, WRONG TOKENS")
            with self.lock:
                self.wrong.append(f"prompt {i}: got {ids}, expected {self.refs[i]}")


def chaos(pool: Pool, until: float, rng: random.Random, events: Counter) -> None:
    while True:
        wait = rng.uniform(*CHAOS_EVERY_S)
        if time.monotonic() + wait + 10 > until:
            return
        time.sleep(wait)
        role, p = rng.choice(pool.procs()[1:])
        if rng.random() < 0.5:
            p.kill()
            events[f"SIGKILL {role}"] += 1
            try:
                pool.replace(role, p)
            except RuntimeError as e:      # the replacement did not start: the run fails
                events[f"restart of a {role} worker FAILED: {str(e)[:200]}"] += 1
        else:
            p.signal(signal.SIGSTOP)
            time.sleep(rng.uniform(*STOP_S))
            p.signal(signal.SIGCONT)
            events[f"SIGSTOP/SIGCONT {role}"] += 1


def drained(pool: Pool, client: RouterClient) -> bool:
    s = client.stats()
    if s.running or s.waiting:
        return False
    for role, p in pool.procs()[1:]:
        w = worker_stats(role, p.address)
        if w is None or w.running or w.waiting or w.kv_used_bytes or w.kv_transport_held_bytes:
            return False
    return True


def exposed(pool: Pool) -> list[str]:
    """The sockets of the router and workers on an address other than loopback (tests/listening.py)."""
    return [f"listening beyond loopback: {s}"
            for _, p in pool.procs() for s in beyond_loopback(listeners(processes(p.pid)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 30)))
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--kv-transport", default="grpc", choices=["grpc", "nixl"], help="how K/V goes prefill -> decode")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(1, EOS) for _ in range(rng.randint(2, 60))] for _ in range(PROMPTS)]
    ref = tiny_llama()
    refs = {i: reference_greedy(ref, p, NEW, ignore_eos=True) for i, p in enumerate(prompts)}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="baton-soak-") as tmp:
        model_dir = save_tiny(os.path.join(tmp, "model"))
        pool = Pool(model_dir, a.kv_transport)
        try:
            with RouterClient(pool.router.address) as client:
                wait_for(lambda: client.stats().decode_workers == 2 and client.stats().prefill_workers == 2, 60,
                         what="2 prefill and 2 decode workers live")
                t0 = time.monotonic()
                start = snapshot(pool, client, f"start (soak of {a.minutes:g} min)")
                problems += exposed(pool)
                base = client.stats()
                until = t0 + a.minutes * 60
                load, events = Load(pool.router.address, refs, prompts, until), Counter()
                threads = [threading.Thread(target=load.client, args=(a.seed + k,)) for k in range(CLIENTS)]
                threads.append(threading.Thread(target=chaos, args=(pool, until, random.Random(a.seed), events)))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                print(f"\nload stopped after {(time.monotonic() - t0) / 60:.1f} min; chaos: {dict(events)}")
                try:
                    wait_for(lambda: drained(pool, client), DRAIN_S, interval=1.0, what="router and workers drained")
                except AssertionError as e:
                    problems.append(str(e))
                end = snapshot(pool, client, "end (load stopped, drained)")
                problems += exposed(pool)
                s = client.stats()
                print("\nrouter books over the run: " + ", ".join(
                    f"{k} {getattr(s, k) - getattr(base, k)}" for k in
                    ("completed", "failed", "cancelled", "rejected", "prefill_retries", "migrations")))
                settled = sum(getattr(s, k) - getattr(base, k) for k in ("completed", "failed", "cancelled", "rejected"))
                print(f"router settled {settled} requests (its own warm-ups included); the clients sent "
                      f"{sum(load.outcomes.values())}")
                print("\noutcomes (client side):")
                for k, n in sorted(load.outcomes.items()):
                    print(f"  {k}: {n}")
                problems += load.wrong
                problems += [k for k in events if "FAILED" in k]
                problems += [f"{role} pid {p.pid} exited on its own" for role, p in pool.procs() if p.p.poll() is not None]
                problems += [f"unclear failure: {k} x{n}" for k, n in load.outcomes.items()
                             if ": " in k and k.split(": ")[1] not in CLEAR and not k.split(": ")[1].startswith(("OK", "cancelled"))]
                for pid in pool.original & start.keys() & end.keys():
                    if end[pid]["fds"] - start[pid]["fds"] > FD_SLACK:
                        problems.append(f"pid {pid}: open fds {start[pid]['fds']} -> {end[pid]['fds']}")
        finally:
            pool.stop()
    print("\nSOAK " + ("FAILED:\n  " + "\n  ".join(problems) if problems else "PASSED"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
