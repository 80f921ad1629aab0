"""An affiliate: what one node tells the cluster about itself through discovery."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv6Address

from kubespan_dp.netutil import Address, IPAddress, IPNetwork


@dataclass(frozen=True)
class KubeSpanInfo:
    """The KubeSpan part of an affiliate (absent when the node runs without KubeSpan)."""

    public_key: str  # WireGuard public key, base64
    address: IPv6Address  # the node's KubeSpan ULA address
    additional_addresses: tuple[IPNetwork, ...] = ()  # advertised networks (pod CIDRs)
    endpoints: tuple[Address, ...] = ()  # candidate WireGuard endpoints (ip, port)
    # networks the node asks peers not to route to it (filters.excludeAdvertisedNetworks)
    exclude_advertised_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Affiliate:
    node_id: str
    hostname: str = ""
    nodename: str = ""
    machine_type: str = ""
    operating_system: str = ""
    addresses: tuple[IPAddress, ...] = ()
    kubespan: KubeSpanInfo | None = None
    control_plane_api_port: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
