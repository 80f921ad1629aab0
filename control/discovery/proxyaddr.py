"""The client's address, behind proxies the operator trusts.

A proxy in front of the service (nginx, Envoy, HAProxy in HTTP mode) is the TCP peer of
every call; it passes the real client's address in X-Real-IP or X-Forwarded-For. Anybody
can send those headers, so they count only on calls whose TCP peer lies in one of the
``--trusted-proxy`` networks. X-Real-IP wins when valid; otherwise X-Forwarded-For is read
from the right (the hop nearest to us), skipping trusted proxies: the first address that
is not one of ours is the client (Envoy's ``xff_trusted_cidrs`` rule). If every hop is
trusted, the leftmost is the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import unquote

Metadata = Iterable[tuple[str, Any]]


def peer_ip(peer: str) -> str | None:
    """The IP in a gRPC peer string ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5'); None for unix sockets."""
    peer = unquote(peer)
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            host = peer[len(prefix) :].rsplit(":", 1)[0].strip("[]")
            return parse_ip(host.split("%", 1)[0])
    return None


def parse_ip(text: str) -> str | None:
    """An address as proxies write it (bare, '1.2.3.4:80', '[::1]:80'), normalized; or None.

    A v4 address mapped into v6 (a dual-stack listener's view of a v4 client) comes out v4.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


@dataclass(frozen=True)
class ClientAddress:
    ip: str | None  # None: a unix-socket peer
    forwarded: bool  # the address came from a trusted proxy's header
    via_trusted_proxy: bool  # the TCP peer is a trusted proxy (header or not)


class ProxyTrust:
    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: list[IPv4Network | IPv6Network] = [
            ip_network(n, strict=False) for n in networks
        ]

    def trusts(self, ip: str) -> bool:
        addr = ip_address(ip)
        return any(addr in net for net in self.networks)

    def client(self, peer: str, metadata: Metadata | None) -> ClientAddress:
        ip = peer_ip(peer)
        if ip is None or not self.networks or not self.trusts(ip):
            return ClientAddress(ip, False, False)
        real: str | None = None
        forwarded_for: list[str] = []
        for key, value in metadata or ():
            if not isinstance(value, str):
                continue  # binary headers (-bin) are never addresses
            key = key.lower()
            if key == "x-real-ip" and real is None:
                real = parse_ip(value)
            elif key == "x-forwarded-for":
                forwarded_for += value.split(",")
        if real is None:
            real = self._from_forwarded_for(forwarded_for)
        if real is None:
            return ClientAddress(ip, False, True)
        return ClientAddress(real, True, True)

    def _from_forwarded_for(self, hops: list[str]) -> str | None:
        found = None
        for hop in reversed(hops):
            addr = parse_ip(hop)
            if addr is None:
                break  # what lies left of a malformed hop cannot be trusted
            found = addr
            if not self.trusts(addr):
                break
        return found
