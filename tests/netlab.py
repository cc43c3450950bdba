"""Worker processes in their own network namespaces, joined by shaped veth links (tests/test_netns.py,
tests/netns_bench.py).

    root namespace (test, router, relays) --veth-- hub namespace (bridge) --veth-- one namespace per worker

Every veth is shaped both ways with `tc tbf` (bandwidth). One-way delay and loss come from
`tc netem` under the tbf where the kernel has sch_netem; where it has not, delay comes from a
userspace relay per worker (tests/netns_relay.py) in the root namespace, and nothing is lost.
The router reaches each worker through its relay, and so does every prefill worker pushing K/V
to a decode worker: every byte between two workers crosses two shaped veths and the relay.
Workers therefore do not register themselves (their own address is the one behind the relay):
the test registers each one with its relay's address.

Names carry a random suffix; Lab.close() deletes every namespace it made (which deletes their
veths), and the processes are stopped by pid.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

from deploy.procs import Proc, wait_for
from baton.v1 import router_pb2

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except OSError as e:      # no such program: a failure like any other
        r = subprocess.CompletedProcess(cmd, 127, "", str(e))
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def why_not_permitted() -> str | None:
    """None when namespaces, veth pairs and tbf work here; else why not (the skip reason)."""
    ns = f"bprobe{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "va", "root", "tbf", "rate", "1gbit",
           "burst", "256kb", "latency", "50ms")
        return None
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"network namespaces, veth or tc tbf not permitted here: {e}"
    finally:
        sh("ip", "netns", "del", ns, check=False)


def has_netem() -> bool:
    ns = f"bprobe{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", ns)
        return sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def rx_tx_bytes(pid: int, dev: str = "e0") -> tuple[int, int]:
    """Bytes received and sent on `dev` in the network namespace of process `pid`."""
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise KeyError(dev)


class Lab:
    """The hub, the root's link to it, and one namespace per worker; all links shaped alike."""

    def __init__(self, rate: str | None = "1gbit", delay_ms: float = 1.0, loss_pct: float = 0.0):
        self.sfx = uuid.uuid4().hex[:6]
        self.net = self._free_subnet()
        self.hub = f"bhub{self.sfx}"
        self.root_dev = f"br{self.sfx}"
        self.namespaces: list[str] = []
        self.links: list[tuple[str | None, str]] = []     # (namespace or None for root, device): every shaped end
        self.netem = has_netem()
        self.rate, self.delay_ms, self.loss_pct = rate, delay_ms, loss_pct
        self.relay_delay_ms = 0.0 if self.netem and rate else delay_ms
        self.hosts = 1
        try:
            self._add_ns(self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            self.root_ip = self._join(None, self.root_dev, "proot")
        except BaseException:
            self.close()
            raise

    @property
    def emulated(self) -> str:
        if self.relay_delay_ms:
            how = f"{self.delay_ms:g} ms one-way delay per worker by a userspace relay (no sch_netem); no loss"
        elif self.netem and self.rate:
            how = f"tc netem delay {self.delay_ms:g} ms loss {self.loss_pct:g} %"
        else:
            how = "no added delay or loss"
        shaped = f"tc tbf {self.rate} each way on every veth" if self.rate else "veths unshaped"
        return f"{shaped}; {how}"

    @staticmethod
    def _free_subnet() -> str:
        used = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
        for _ in range(100):
            net = f"10.{random.randint(128, 254)}.{random.randint(0, 254)}"
            if f"{net}." not in used:
                return net
        raise RuntimeError("no free 10.x.y.0/24 subnet")

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _join(self, ns: str | None, dev: str, port: str) -> str:
        """A veth from `ns` (None: the root namespace) to the hub's bridge; returns its address."""
        if ns:
            self.hosts += 1
        ip = f"{self.net}.{self.hosts if ns else 1}"
        where = ["netns", ns] if ns else []
        sh("ip", "link", "add", "name", dev, *where, "type", "veth", "peer", "name", port, "netns", self.hub)
        inside = ["ip", "-n", ns] if ns else ["ip"]
        sh(*inside, "addr", "add", f"{ip}/24", "dev", dev)
        sh(*inside, "link", "set", dev, "up")
        sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        for end in ((ns, dev), (self.hub, port)):
            self.links.append(end)
            self.shape(*end, self.rate)
        return ip

    def shape(self, ns: str | None, dev: str, rate: str | None) -> None:
        """tbf at `rate` on the device's egress (1 ms of bytes as burst, at least 128 KiB: a GSO
        packet must fit), netem under it where there is one. rate None: the veth as it is."""
        if rate is None:
            return
        bits = int(float(rate.rstrip("kmgbit")) * {"k": 1e3, "m": 1e6, "g": 1e9}[rate.rstrip("bit")[-1]])
        burst = max(128 << 10, bits // 8 // 1000)
        tc = ["ip", "netns", "exec", ns, "tc"] if ns else ["tc"]
        sh(*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf", "rate", rate, "burst", str(burst),
           "latency", "100ms")
        if self.netem:
            sh(*tc, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay",
               f"{self.delay_ms}ms", "loss", f"{self.loss_pct}%")

    def reshape(self, rate: str) -> None:
        for ns, dev in self.links:
            self.shape(ns, dev, rate)
        self.rate = rate

    def add(self, name: str) -> tuple[str, str]:
        """A namespace joined to the hub; returns (namespace, its address)."""
        ns = f"b{name}{self.sfx}"
        self._add_ns(ns)
        return ns, self._join(ns, "e0", f"p{name}{self.sfx}"[:15])

    def link(self, ns: str, up: bool) -> None:
        """Cut (or mend) a worker's link: its veth down, as a pulled cable."""
        sh("ip", "-n", ns, "link", "set", "e0", "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.namespaces):   # a namespace takes its veths with it, and their peers
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.root_dev, check=False)
        self.namespaces = []


class NetWorker:
    """A worker process in its own namespace, and the relay in front of it."""

    def __init__(self, lab: Lab, role: str, name: str, model_dir: str, args=()):
        self.role, self.name = role, name
        self.ns, self.ip = lab.add(name)
        self.worker_id = f"{name}-{lab.sfx}"
        module = "decode_service" if role in ("decode", "colocated") else "prefill_service"
        self.proc = Proc(["netns_enter", self.ns, module, "--host", self.ip, "--port", "0", "--model", model_dir,
                          "--worker-id", self.worker_id, *args], env=ENV)
        try:
            self.relay = Proc(["netns_relay", "--listen", lab.root_ip, "--to", self.proc.address,
                               "--delay-ms", str(lab.relay_delay_ms)], env=ENV)
        except BaseException:
            self.proc.kill()
            raise

    @property
    def address(self) -> str:
        """Where the router and the other workers reach it: its relay."""
        return self.relay.address

    def info(self) -> router_pb2.WorkerInfo:
        return router_pb2.WorkerInfo(role=self.role, worker_id=self.worker_id, pid=self.proc.pid,
                                     node=socket.gethostname(), address=self.address)

    def stop(self) -> None:
        self.proc.stop()
        self.relay.kill()


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        with contextlib.suppress(grpc.RpcError):
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING
    return False


@contextlib.contextmanager
def net_cluster(model_dir: str, roles: dict[str, str], *, rate: str | None = "1gbit", delay_ms: float = 1.0,
                loss_pct: float = 0.0, router_args=(), worker_args=()):
    """A router in the root namespace and one worker per `roles` entry (name -> role) in its own
    namespace, registered through their relays; yields (lab, router Proc, {name: NetWorker})."""
    from router.client import RouterClient
    lab = Lab(rate, delay_ms, loss_pct)
    procs: list[Proc] = []
    workers: dict[str, NetWorker] = {}
    try:
        router = Proc(["router", "--port", "0", "--model", model_dir, *router_args])
        procs.append(router)
        common = ["--threads", "1", *worker_args]
        with ThreadPoolExecutor(len(roles)) as pool:   # model loads overlap
            futs = {name: pool.submit(NetWorker, lab, role, name, model_dir, common) for name, role in roles.items()}
            for name, fut in futs.items():
                with contextlib.suppress(Exception):
                    workers[name] = fut.result()
            for fut in futs.values():
                fut.result()   # raise the first failure once every worker that did start is known
        with RouterClient(router.address) as c:
            for w in workers.values():
                c.register_worker(w.info())
        wait_for(lambda: _serving(router.address), 60, what="router SERVING")
        yield lab, router, workers
    except BaseException:
        for p in procs + [w.proc for w in workers.values()]:
            print(f"---- {p.args[:3]} (pid {p.pid}) ----\n" + "".join(p.log[-60:]))
        raise
    finally:
        for w in workers.values():
            w.stop()
        for p in procs:
            p.stop()
        lab.close()
