"""Fault drill: start `baton up`, keep a load on it, SIGKILL a prefill worker, then the busiest
decode worker, and report start-up time to SERVING, how long each fault took to heal, the worst
request latency around it, and how many requests were retried or migrated.

    python -m deploy.drill [--model smollm2] [--dtype float32] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass

from deploy.procs import Proc, wait_for
from router.client import RouterClient


@dataclass
class Outcome:
    prompt: list[int]
    start: float
    end: float
    token_ids: list[int] | None    # None when it failed
    error: str | None = None


class Load:
    """Closed-loop load from a few threads until stopped; records every request's outcome.
    make_prompt(rng) -> token ids; greedy, ignore_eos, so outputs can be checked token by token."""

    def __init__(self, client: RouterClient, threads: int = 4, max_new_tokens: int = 32, make_prompt=None,
                 timeout_s: float = 120.0):
        self.client, self.max_new, self.timeout_s = client, max_new_tokens, timeout_s
        # Default: chat turns to long documents, so prefills last long enough to be killed mid-way.
        self.make_prompt = make_prompt or (lambda rng: [rng.randrange(100, 40000) for _ in range(rng.randint(8, 1024))])
        self.done: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            prompt = self.make_prompt(rng)
            t = time.monotonic()
            try:
                ids = self.client.complete(prompt, max_new_tokens=self.max_new, ignore_eos=True, timeout=self.timeout_s)[1]
                self.done.append(Outcome(prompt, t, time.monotonic(), ids))
            except Exception as e:  # counted and reported, never hidden
                self.done.append(Outcome(prompt, t, time.monotonic(), None, repr(e)[:200]))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(150)


def workers(client: RouterClient, role: str):
    return [w for w in client.status().workers if w.role == role]


def restarted(client: RouterClient, victim) -> bool:
    """Ray restarted the killed worker: the same id serves again from a new pid."""
    return any(w.worker_id == victim.worker_id and w.alive and w.pid != victim.pid for w in workers(client, victim.role))


def _kill_and_heal(client: RouterClient, load: Load, role: str, settle_s: float) -> dict:
    """SIGKILL one worker of `role` under load; time until Ray's restart of it serves again."""
    before = client.stats()
    busy = wait_for(lambda: [w for w in workers(client, role) if w.running > 0], 60, 0.01, what=f"a busy {role} worker")
    victim = max(busy, key=lambda w: w.running)
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: restarted(client, victim), 180, 0.05, what=f"{role} worker restarted")
    healed = time.monotonic() - t_kill
    time.sleep(settle_s)
    after = client.stats()
    hit = [o.end - o.start for o in load.done if o.start <= t_kill <= o.end]  # in flight at the kill
    return {"role": role, "healed_s": healed, "in_flight_at_kill": len(hit),
            "worst_latency_in_flight_s": max(hit, default=0.0),
            "prefill_retries": after.prefill_retries - before.prefill_retries,
            "migrations": after.migrations - before.migrations}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=4)
    a = p.parse_args(argv)
    t0 = time.monotonic()
    up = Proc(["deploy.cli", "up", "--port", "0", "--model", a.model, "--dtype", a.dtype,
               "--prefill-workers", "2", "--decode-workers", "2", "--max-batch", "16"],
              env={"RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=600)
    startup = time.monotonic() - t0
    try:
        with RouterClient(up.address) as client, Load(client, a.threads, a.max_new_tokens) as load:
            time.sleep(5)
            faults = [_kill_and_heal(client, load, role, settle_s=5) for role in ("prefill", "decode")]
            time.sleep(2)
        ok = [o.end - o.start for o in load.done if o.error is None]
        errors = [o.error for o in load.done if o.error is not None]
    finally:
        t = time.monotonic()
        up.stop(30)
        stopped = time.monotonic() - t
    print(f"start-up to SERVING: {startup:.1f} s; SIGTERM to exit: {stopped:.1f} s")
    print(f"requests: {len(ok)} completed, {len(errors)} failed {errors[:3]}; "
          f"latency p50 {statistics.median(ok):.2f} s, max {max(ok):.2f} s")
    print("| fault | healed (restarted worker serving) s | in flight at kill | worst latency of those s "
          "| prefill retries | migrations |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in faults:
        print(f"| SIGKILL {f['role']} | {f['healed_s']:.1f} | {f['in_flight_at_kill']} | "
              f"{f['worst_latency_in_flight_s']:.2f} | {f['prefill_retries']} | {f['migrations']} |")


if __name__ == "__main__":
    main()
