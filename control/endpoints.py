"""The local affiliate: which addresses this node announces and which endpoints it offers.

Order matters everywhere here, because peers try endpoints in the order given:

1. node addresses (Talos's NodeAddressController): the interface addresses of links
   that are up, minus loopback, link-local, multicast and unspecified ones, sorted by
   the configured algorithm (``machine.features.nodeAddressSortAlgorithm``: v1 by
   default, v2 opt-in), deduplicated by IP, minus the Kubernetes pod and service
   networks (Talos's "no-k8s" address filter);
2. endpoint IPs: those minus the node's own KubeSpan address and SideroLink ULAs,
   then the public IPs discovery echoed back, each appended unless already present;
3. ``filters.endpoints`` applied in order: a CIDR appends the matching IPs not yet in
   the result, ``!CIDR`` removes matches (so the filter order decides the output order);
4. each IP gets the KubeSpan port (51820, or ours when configured);
5. ``extraAnnouncedEndpoints`` appended, skipping ones already present.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from functools import cmp_to_key
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
)
from pathlib import Path
from typing import Any

from control.affiliate import Affiliate, KubeSpanInfo
from control.config import (
    CONTROL_PLANE_TYPES,
    KUBESPAN_DEFAULT_PORT,
    POD_CIDRS_HELP,
    MachineConfig,
    parse_subnet_or_address,
)
from control.identity import KubeSpanIdentity
from control.ula import ULA_SIDEROLINK, is_ula
from kubespan_dp.netutil import Address, IPAddress, IPNetwork

log = logging.getLogger(__name__)

OPERATING_SYSTEM = "kubespan-py (0.1.0)"
_RT_SCOPE_LINK = 253
# Talos's host DNS listener address: on a Talos node, never a node address.
HOST_DNS_IPV6 = IPv6Address("fd54:616c:6f73::204f:5320:444e:531")

IPInterface = IPv4Interface | IPv6Interface


def _as_interface(value: object) -> IPInterface:
    # Interfaces first: IPv4Interface and IPv6Interface are subclasses of the address types.
    if isinstance(value, (IPv4Interface, IPv6Interface)):
        return value
    if isinstance(value, (IPv4Address, IPv6Address)):
        return ip_interface(value)  # a bare IP is a host prefix (/32, /128)
    return ip_interface(str(value))


def _cmp(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def compare_v1(a: IPInterface, b: IPInterface) -> int:
    """Talos's v1 (legacy, default) order: by address, IPv4 before IPv6, then prefix length."""
    return _cmp((a.version, int(a.ip)), (b.version, int(b.ip))) or _cmp(
        a.network.prefixlen, b.network.prefixlen
    )


def compare_v2(a: IPInterface, b: IPInterface) -> int:
    """Talos's v2 order: IPv4 first; a more specific prefix before one that contains it;
    else by address (the same address: the longer prefix first)."""
    if c := _cmp(a.version, b.version):
        return c
    if a.ip == b.ip:
        return -_cmp(a.network.prefixlen, b.network.prefixlen)
    a_contains_b, b_contains_a = b.ip in a.network, a.ip in b.network
    if a_contains_b != b_contains_a:
        return 1 if a_contains_b else -1
    return _cmp(int(a.ip), int(b.ip))


SORT_ALGORITHMS: dict[str, Callable[[IPInterface, IPInterface], int]] = {
    "v1": compare_v1,
    "v2": compare_v2,
}


def sort_prefixes(addresses: Iterable[object], algorithm: str = "v1") -> list[IPInterface]:
    """Interface addresses in the order Talos sorts node addresses (v1 or v2)."""
    return sorted(map(_as_interface, addresses), key=cmp_to_key(SORT_ALGORITHMS[algorithm]))


def node_addresses(
    addresses: Iterable[object],
    exclude_networks: Iterable[IPNetwork] = (),
    algorithm: str = "v1",
) -> list[IPAddress]:
    """Usable node IPs from interface addresses ("1.2.3.4/24", IPv4Interface, ip), in
    Talos's order: sorted by `algorithm` (the prefix length counts in v2), one entry per
    IP, addresses inside `exclude_networks` (pod and service networks) left out."""
    usable = []
    for iface in sort_prefixes(addresses, algorithm):
        ip = iface.ip
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if ip != HOST_DNS_IPV6:
            usable.append(iface)
    excluded = list(exclude_networks)
    out: dict[IPAddress, None] = {}  # ordered set
    for iface in usable:
        ip = iface.ip
        if not any(ip.version == net.version and ip in net for net in excluded):
            out.setdefault(ip)
    return list(out)


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


def kubernetes_nodename(hostname: str, fqdn: bool = False) -> str:
    """The Kubernetes node name Talos derives from the hostname (short unless `fqdn`):
    lowercased, '_' -> '-', only [a-z0-9.-] kept, no leading/trailing '-' or '.'."""
    name = hostname if fqdn else hostname.split(".", 1)[0]
    out = []
    for ch in name:
        if "a" <= ch <= "z" or "0" <= ch <= "9" or ch in "-.":
            out.append(ch)
        elif "A" <= ch <= "Z":
            out.append(ch.lower())
        elif ch == "_":
            out.append("-")
    return "".join(out).strip("-.") or hostname  # Talos refuses an empty name; keep ours


def system_hostname(kernel: str | Path = "/proc/sys/kernel") -> str:
    """This machine's name as Talos publishes it (its FQDN): the kernel hostname, plus
    "." and the kernel domain name when one is set (Talos sets both)."""
    root = Path(kernel)
    try:
        host = (root / "hostname").read_text().strip()
        domain = (root / "domainname").read_text().strip()
    except OSError:
        return socket.gethostname()
    if not host:
        return socket.gethostname()
    if "." in host or domain in ("", "(none)"):
        return host
    return f"{host}.{domain}"


_warned: set[str] = set()  # conditions already logged, so a 30 s loop warns once


def _warn_once(key: str, active: bool, message: str, *args: object) -> None:
    if not active:
        _warned.discard(key)  # warn again if it comes back
    elif key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def local_affiliate(
    *,
    node_id: str,
    hostname: str,
    addresses: Sequence[object],
    config: MachineConfig,
    identity: KubeSpanIdentity | None,
    public_ips: Iterable[IPAddress] = (),
    nodename: str | None = None,
    machine_type: str | None = None,
) -> Affiliate:
    """What this node publishes to discovery (Talos's LocalAffiliateController).

    `addresses` are the node's interface addresses with their prefixes
    (system_addresses()): they are sorted and filtered here as Talos does.
    `hostname` is the FQDN (system_hostname()); the machine type, nodename and API
    server port come from the config unless given."""
    ks = config.kubespan
    node = config.node
    ips = node_addresses(addresses, config.kubernetes_networks, node.address_sort)
    _warn_once(
        "pod-cidrs",
        ks.enabled and ks.advertise_kubernetes_networks and not config.local.pod_cidrs,
        "advertiseKubernetesNetworks is on but no pod CIDRs are configured: "
        "no pod network is advertised. %s",
        POD_CIDRS_HELP,
    )
    kubespan = None
    if identity is not None and ks.enabled:
        kubespan = KubeSpanInfo(
            public_key=identity.public_key_b64,
            address=identity.address.ip,
            additional_addresses=tuple(config.local.pod_cidrs)
            if ks.advertise_kubernetes_networks
            else (),
            endpoints=tuple(
                announced_endpoints(
                    ips,
                    kubespan_address=identity.address.ip,
                    public_ips=public_ips,
                    filters=ks.endpoint_filters,
                    # relays (ours) last: peers try the direct endpoints first
                    extra_endpoints=(*ks.extra_announced_endpoints, *config.local.relays),
                    port=config.local.listen_port,
                )
            ),
            exclude_advertised_networks=tuple(ks.exclude_advertised_networks),
        )
    machine_type = machine_type or node.machine_type
    return Affiliate(
        node_id=node_id,
        hostname=hostname,
        nodename=nodename or kubernetes_nodename(hostname, node.register_with_fqdn),
        machine_type=machine_type,
        operating_system=OPERATING_SYSTEM,
        addresses=tuple(ip for ip in ips if not is_ula(ip, ULA_SIDEROLINK)),
        kubespan=kubespan,
        # Talos publishes the kube-apiserver's local port for control planes only.
        control_plane_api_port=node.api_server_port
        if machine_type in CONTROL_PLANE_TYPES
        else None,
    )


def system_addresses(
    netns: str | None = None, exclude_links: Iterable[str] = ()
) -> list[IPInterface]:
    """The kernel's addresses with their prefixes (links up, scope below link), in link
    order: the raw input of node_addresses() and local_affiliate()."""
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
                iface = ip_interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
                found.append((addr["index"], iface))
    finally:
        ipr.close()
    found.sort(key=lambda pair: pair[0])
    return [iface for _, iface in found]
