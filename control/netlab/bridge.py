"""Hosts as namespaces on one bridge, the bridge in a namespace of its own.

Nothing touches the root namespace's links and no host has a route to the outside.
Underlay addresses come from the documentation ranges (192.0.2.0/24, 2001:db8::/64),
which are never routed anywhere real.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from control.netlab.lab import Lab, add_address
from control.netlab.netns import Netns

UNDERLAY_V4 = "192.0.2.{}"
UNDERLAY_V6 = "2001:db8::{:x}"
PREFIX_V4 = 24
PREFIX_V6 = 64


@dataclass
class Host:
    """A named namespace with an uplink; `name` is the host's, `netns` the namespace's."""

    name: str
    ns: Netns
    index: int
    address4: IPv4Address
    address6: IPv6Address | None = None

    @property
    def netns(self) -> str:
        return self.ns.name

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.ns.run(*argv, check=check, timeout=timeout)

    def spawn(
        self, *argv: str, log_path: str | Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        """Start a long-running process in the host; the lab stops it on close."""
        return self.ns.popen(argv, log=log_path, env=env)


class Bridge:
    """Bridge `br0` in namespace TAG-br; each host joins it with a veth named `eth0`."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns = lab.netns("br")
        self.hosts: list[Host] = []
        self.ns.run("ip", "link", "add", "br0", "type", "bridge")
        self.ns.run("ip", "link", "set", "br0", "up")

    def add_host(
        self, name: str | None = None, pre_uplink: Callable[[Host], None] | None = None
    ) -> Host:
        """A new host NAME (default nodeN) with eth0 on the bridge and underlay addresses.

        `pre_uplink` runs before eth0 exists, to create links that must come first in
        the namespace's link order (e.g. an address announced ahead of the underlay's).
        """
        index = len(self.hosts) + 1
        name = name or f"node{index}"
        host = Host(
            name,
            self.lab.netns(name),
            index,
            IPv4Address(UNDERLAY_V4.format(index)),
            IPv6Address(UNDERLAY_V6.format(index)),
        )
        self.hosts.append(host)
        if pre_uplink is not None:
            pre_uplink(host)
        port, _ = self.lab.veth(self.ns, host.ns, name_b="eth0")
        self.ns.run("ip", "link", "set", port, "master", "br0")
        add_address(host.ns, "eth0", f"{host.address4}/{PREFIX_V4}")
        add_address(host.ns, "eth0", f"{host.address6}/{PREFIX_V6}")
        return host
