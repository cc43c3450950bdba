"""Every listening TCP socket of the processes one launch started (psutil): the process tree of its
pid, plus any process of the same Ray session that left the tree (Ray's daemons name their session
on their command line), so that nothing it opened escapes the check."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

import psutil

LOOPBACK = {"127.0.0.1", "::1"}
WILDCARD = {"0.0.0.0", "::"}
_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


@dataclass(frozen=True)
class Listener:
    ip: str        # IPv4-mapped IPv6 addresses (::ffff:127.0.0.1) as their IPv4 address
    port: int
    pid: int
    process: str

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} ({self.process}, pid {self.pid})"


def plain_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def processes(root_pid: int) -> list[psutil.Process]:
    """The tree under root_pid and every other process of a Ray session named in that tree."""
    try:
        root = psutil.Process(root_pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    sessions = set()
    for p in tree:
        try:
            sessions.update(_SESSION.findall(" ".join(p.cmdline())))
        except psutil.Error:
            pass
    pids = {p.pid for p in tree}
    for p in psutil.process_iter():
        if p.pid in pids or not sessions:
            continue
        try:
            if any(s in " ".join(p.cmdline()) for s in sessions):
                tree.append(p)
        except psutil.Error:
            pass
    return tree


def _name(p: psutil.Process) -> str:
    """The program and its first words: `gcs_server --log_dir=...`, `python -m deploy.cli up ...`, `ray::IDLE`."""
    try:
        cmd = p.cmdline()
        return " ".join([os.path.basename(cmd[0]), *cmd[1:]])[:60].strip() if cmd else p.name()
    except psutil.Error:
        return "?"


def listeners(procs: list[psutil.Process]) -> list[Listener]:
    found = []
    for p in procs:
        try:
            conns = p.net_connections("inet")
        except psutil.Error:
            continue
        found += [Listener(plain_ip(c.laddr.ip), c.laddr.port, p.pid, _name(p))
                  for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def still_listening(ports: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of these (ip, port) anything on this machine still listens on."""
    return {(plain_ip(c.laddr.ip), c.laddr.port) for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN} & ports


def beyond_loopback(found: list[Listener], allowed: set[int] = frozenset()) -> list[Listener]:
    """The sockets on an address other than loopback, but for wildcard ones on an allowed port."""
    return [s for s in found if s.ip not in LOOPBACK and not (s.ip in WILDCARD and s.port in allowed)]
