"""The local affiliate: which addresses this node announces and which endpoints it offers.

Order matters everywhere here, because peers try endpoints in the order given:

1. node addresses: current addresses minus loopback, link-local, multicast and
   unspecified ones (and Kubernetes networks), deduplicated by IP in first-seen order;
2. endpoint IPs: those minus the node's own KubeSpan address and SideroLink ULAs,
   then the public IPs discovery echoed back, each appended unless already present;
3. ``filters.endpoints`` applied in order: a CIDR appends the matching IPs not yet in
   the result, ``!CIDR`` removes matches (so the filter order decides the output order);
4. each IP gets the KubeSpan port (51820, or ours when configured);
5. ``extraAnnouncedEndpoints`` appended, skipping ones already present.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
)

from control.affiliate import Affiliate, KubeSpanInfo
from control.config import KUBESPAN_DEFAULT_PORT, MachineConfig, parse_subnet_or_address
from control.identity import KubeSpanIdentity
from control.ula import ULA_SIDEROLINK, is_ula
from kubespan_dp.netutil import Address, IPAddress, IPNetwork

log = logging.getLogger(__name__)

OPERATING_SYSTEM = "kubespan-py (0.1.0)"
_RT_SCOPE_LINK = 253


def _as_ip(value: object) -> IPAddress:
    # Interfaces first: IPv4Interface and IPv6Interface are subclasses of the address types.
    if isinstance(value, (IPv4Interface, IPv6Interface)):
        return value.ip
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    return ip_interface(str(value)).ip


def node_addresses(
    addresses: Iterable[object], exclude_networks: Iterable[IPNetwork] = ()
) -> list[IPAddress]:
    """Usable node IPs from interface addresses ("1.2.3.4/24", IPv4Interface, ip), in order."""
    excluded = list(exclude_networks)
    out: list[IPAddress] = []
    for value in addresses:
        ip = _as_ip(value)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if any(ip.version == net.version and ip in net for net in excluded):
            continue
        if ip not in out:
            out.append(ip)
    return out


def filter_ips(ips: Sequence[IPAddress], filters: Sequence[str]) -> list[IPAddress]:
    """Apply endpoint filters in order ("CIDR" adds matches, "!CIDR" removes them)."""
    result: list[IPAddress] = []
    for text in filters:
        positive = not text.startswith("!")
        network = parse_subnet_or_address(text.removeprefix("!"))
        for ip in ips:
            if ip.version != network.version or ip not in network:
                continue
            if positive and ip not in result:
                result.append(ip)
            elif not positive and ip in result:
                result.remove(ip)
    return result


def announced_endpoints(
    addresses: Sequence[IPAddress],
    *,
    kubespan_address: IPAddress | None,
    public_ips: Iterable[IPAddress] = (),
    filters: Sequence[str] | None = None,
    extra_endpoints: Iterable[Address] = (),
    port: int = KUBESPAN_DEFAULT_PORT,
) -> list[Address]:
    """The endpoints this node offers to peers, in the order peers should try them."""
    ips = [ip for ip in addresses if ip != kubespan_address and not is_ula(ip, ULA_SIDEROLINK)]
    for public in public_ips:
        if public not in ips:
            ips.append(public)
    if filters is not None:
        ips = filter_ips(ips, filters)
    endpoints: list[Address] = [(str(ip), port) for ip in ips]
    for ip, p in extra_endpoints:
        endpoint = (str(ip_address(ip)), p)
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    return endpoints


def local_affiliate(
    *,
    node_id: str,
    hostname: str,
    addresses: Sequence[IPAddress],
    config: MachineConfig,
    identity: KubeSpanIdentity | None,
    public_ips: Iterable[IPAddress] = (),
    nodename: str | None = None,
    machine_type: str = "worker",
) -> Affiliate:
    """What this node publishes to discovery (Talos's LocalAffiliateController)."""
    kubespan = None
    ks = config.kubespan
    if identity is not None and ks.enabled:
        kubespan = KubeSpanInfo(
            public_key=identity.public_key_b64,
            address=identity.address.ip,
            additional_addresses=tuple(config.local.pod_cidrs)
            if ks.advertise_kubernetes_networks
            else (),
            endpoints=tuple(
                announced_endpoints(
                    addresses,
                    kubespan_address=identity.address.ip,
                    public_ips=public_ips,
                    filters=ks.endpoint_filters,
                    extra_endpoints=ks.extra_announced_endpoints,
                    port=config.local.listen_port,
                )
            ),
            exclude_advertised_networks=tuple(ks.exclude_advertised_networks),
        )
    return Affiliate(
        node_id=node_id,
        hostname=hostname,
        nodename=nodename or hostname,
        machine_type=machine_type,
        operating_system=OPERATING_SYSTEM,
        addresses=tuple(ip for ip in addresses if not is_ula(ip, ULA_SIDEROLINK)),
        kubespan=kubespan,
    )


def system_addresses(
    netns: str | None = None, exclude_links: Iterable[str] = ()
) -> list[IPAddress]:
    """Current node addresses read from the kernel (links up, scope below link) in link order."""
    from pyroute2 import IPRoute, NetNS  # imported here: only callers with a kernel need it

    skip = set(exclude_links)
    ipr = NetNS(netns) if netns else IPRoute()
    try:
        up = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            oper = link.get_attr("IFLA_OPERSTATE")
            if name not in skip and link["flags"] & 1 and oper in ("UP", "UNKNOWN"):
                up[link["index"]] = name
        found = []
        for addr in ipr.get_addr():
            if addr["index"] in up and addr["scope"] < _RT_SCOPE_LINK:
                found.append((addr["index"], addr.get_attr("IFA_ADDRESS")))
    finally:
        ipr.close()
    found.sort(key=lambda pair: pair[0])
    return node_addresses(ip for _, ip in found)
