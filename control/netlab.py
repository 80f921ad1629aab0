"""A small lab of hosts built from network namespaces: for the demo and end-to-end tests.

Hosts are namespaces joined to a bridge that lives in its own namespace, so nothing
touches the root namespace's links and no host has a route to the outside. Underlay
addresses come from the documentation ranges (192.0.2.0/24, 2001:db8::/64), which are
never routed anywhere real.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

UNDERLAY_V4 = "192.0.2.{}"
UNDERLAY_V6 = "2001:db8::{:x}"
PREFIX_V4 = 24
PREFIX_V6 = 64


class LabError(RuntimeError):
    """A lab command failed; carries the command and its stderr."""


def run(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    """One namespace with one underlay interface `eth0` on the lab bridge."""

    name: str
    netns: str
    index: int
    address4: IPv4Address
    address6: IPv6Address
    processes: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        return run(self.cmd(*argv), check=check, timeout=timeout)

    def spawn(
        self, *argv: str, log_path: str | None = None, env: dict | None = None
    ) -> subprocess.Popen:
        """Start a long-running process inside the host; the lab stops it on close."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(
            self.cmd(*argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.processes.append(proc)
        return proc


class Lab:
    """Namespaces on a bridge. Use as a context manager: everything is removed on exit."""

    def __init__(self, prefix: str = "ks") -> None:
        self.tag = f"{prefix}{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts: list[Host] = []
        self._closed = False
        run(["ip", "netns", "add", self.bridge_ns])
        self._ns_run(self.bridge_ns, "ip", "link", "set", "lo", "up")
        self._ns_run(self.bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        self._ns_run(self.bridge_ns, "ip", "link", "set", "br0", "up")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _ns_run(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", netns, *argv], check=check)

    def add_host(
        self, name: str | None = None, pre_uplink: Callable[[Host], None] | None = None
    ) -> Host:
        """A new namespace joined to the bridge as `eth0`.

        `pre_uplink` runs before eth0 exists, to create links that must come first in
        the namespace's link order (e.g. an address announced ahead of the underlay's).
        """
        index = len(self.hosts) + 1
        name = name or f"node{index}"
        netns = f"{self.tag}-{name}"
        host = Host(
            name,
            netns,
            index,
            IPv4Address(UNDERLAY_V4.format(index)),
            IPv6Address(UNDERLAY_V6.format(index)),
        )
        run(["ip", "netns", "add", netns])
        self.hosts.append(host)
        if pre_uplink is not None:
            pre_uplink(host)
        outer = f"v{self.tag[-6:]}{index}"
        run(
            [
                "ip",
                "link",
                "add",
                outer,
                "netns",
                self.bridge_ns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
            ]
        )
        self._ns_run(self.bridge_ns, "ip", "link", "set", outer, "master", "br0", "up")
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "addr", "add", f"{host.address4}/{PREFIX_V4}", "dev", "eth0")
        host.run("ip", "-6", "addr", "add", f"{host.address6}/{PREFIX_V6}", "dev", "eth0", "nodad")
        return host

    def unplug(self, host: Host) -> None:
        """Cut a host off the bridge (its link goes down), as if its cable were pulled."""
        outer = f"v{self.tag[-6:]}{host.index}"
        self._ns_run(self.bridge_ns, "ip", "link", "set", outer, "down")

    def replug(self, host: Host) -> None:
        outer = f"v{self.tag[-6:]}{host.index}"
        self._ns_run(self.bridge_ns, "ip", "link", "set", outer, "up")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            stop_processes(host.processes)
        namespaces = [host.netns for host in self.hosts] + [self.bridge_ns]
        for netns in namespaces:
            kill_namespace_processes(netns)
        for netns in namespaces:
            run(["ip", "netns", "del", netns], check=False)


def stop_processes(processes: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM each process group, then SIGKILL what is still running after `grace`."""
    for proc in processes:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in processes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def kill_namespace_processes(netns: str) -> None:
    """Kill whatever still runs in a namespace (e.g. a daemon whose parent was killed)."""
    pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
