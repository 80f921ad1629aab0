"""Peer specs: what WireGuard needs to know about each other affiliate.

For an affiliate with KubeSpan, in this order (as Talos's PeerSpecController):
  allowed = its additional networks (advertised pod CIDRs)
          + its addresses as /32 or /128
          - its excluded networks
          + its KubeSpan address /128
Affiliates are taken in ID order; whatever overlaps an earlier peer's allowed set is
removed from the later one (first come, first served) with a warning, because
WireGuard routes each IP to a single peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, summarize_address_range

from control.affiliate import Affiliate
from kubespan_dp.netutil import Address, IPAddress, IPNetwork

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSpec:
    public_key: str  # base64; the record ID
    address: IPv6Address  # the peer's KubeSpan address
    allowed_ips: tuple[IPNetwork, ...]
    endpoints: tuple[Address, ...]
    label: str


class IPSet:
    """A set of IPs kept as sorted, disjoint, non-adjacent [first, last] ranges per family."""

    def __init__(self) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}

    @staticmethod
    def _span(net: IPNetwork) -> tuple[int, int, int]:
        return net.version, int(net.network_address), int(net.broadcast_address)

    def add_range(self, version: int, lo: int, hi: int) -> None:
        merged = []
        for a, b in self._ranges[version]:
            if b + 1 < lo or hi + 1 < a:
                merged.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self._ranges[version] = sorted(merged)

    def remove_range(self, version: int, lo: int, hi: int) -> None:
        kept = []
        for a, b in self._ranges[version]:
            if b < lo or hi < a:
                kept.append((a, b))
                continue
            if a < lo:
                kept.append((a, lo - 1))
            if hi < b:
                kept.append((hi + 1, b))
        self._ranges[version] = kept

    def add_prefix(self, net: IPNetwork) -> None:
        self.add_range(*self._span(net))

    def add_ip(self, ip: IPAddress) -> None:
        self.add_range(ip.version, int(ip), int(ip))

    def remove_prefix(self, net: IPNetwork) -> None:
        self.remove_range(*self._span(net))

    def remove_set(self, other: IPSet) -> None:
        for version, ranges in other._ranges.items():
            for lo, hi in ranges:
                self.remove_range(version, lo, hi)

    def overlaps(self, other: IPSet) -> bool:
        for version in (4, 6):
            for a, b in self._ranges[version]:
                for c, d in other._ranges[version]:
                    if a <= d and c <= b:
                        return True
        return False

    def is_empty(self) -> bool:
        return not any(self._ranges.values())

    def ranges(self) -> list[str]:
        out = []
        for version, cls in ((4, IPv4Address), (6, IPv6Address)):
            out += [f"{cls(a)}-{cls(b)}" for a, b in self._ranges[version]]
        return out

    def prefixes(self) -> list[IPNetwork]:
        """The minimal prefix list, IPv4 first, ascending (as netipx's IPSet.Prefixes)."""
        out: list[IPNetwork] = []
        for version, cls in ((4, IPv4Address), (6, IPv6Address)):
            for a, b in self._ranges[version]:
                out.extend(summarize_address_range(cls(a), cls(b)))
        return out


def _allowed_set(affiliate: Affiliate) -> IPSet:
    ks = affiliate.kubespan
    assert ks is not None
    ipset = IPSet()
    for net in ks.additional_addresses:
        ipset.add_prefix(net)
    for ip in affiliate.addresses:
        ipset.add_ip(ip)
    for net in ks.exclude_advertised_networks:
        ipset.remove_prefix(net)
    ipset.add_ip(ks.address)
    return ipset


def build_peer_specs(affiliates: Iterable[Affiliate], local_node_id: str) -> list[PeerSpec]:
    """Peer specs for every other affiliate that runs KubeSpan, in affiliate ID order."""
    specs: list[PeerSpec] = []
    taken: dict[str, IPSet] = {}
    for affiliate in sorted(affiliates, key=lambda a: a.node_id):
        ks = affiliate.kubespan
        if affiliate.node_id == local_node_id or ks is None or not ks.public_key:
            continue
        label = affiliate.nodename or affiliate.hostname
        if ks.public_key in taken:
            log.warning(
                "duplicate peer public key, ignoring affiliate %s (label %s, key %s)",
                affiliate.node_id,
                label,
                ks.public_key,
            )
            continue
        ipset = _allowed_set(affiliate)
        for other_key, other in taken.items():
            if other.overlaps(ipset):
                log.warning(
                    "peer address overlap: this_peer=%s other_peer=%s this_ips=%s other_ips=%s",
                    ks.public_key,
                    other_key,
                    ipset.ranges(),
                    other.ranges(),
                )
                ipset.remove_set(other)
                if ipset.is_empty():
                    log.warning(
                        "conflict resolution removed all ranges: this_peer=%s other_peer=%s",
                        ks.public_key,
                        other_key,
                    )
        taken[ks.public_key] = ipset
        specs.append(
            PeerSpec(
                public_key=ks.public_key,
                address=ks.address,
                allowed_ips=tuple(ipset.prefixes()),
                endpoints=tuple(ks.endpoints),
                label=label,
            )
        )
    return specs
