"""Talos's unique local addresses: one /64 per cluster and feature.

fdXX:XXXX:XXXX:XX<space>::/64, where the X bytes come from the cluster id and the
space byte names the feature (KubeSpan, SideroLink). Both the address KubeSpan
derives and the checks that recognise one live here.
"""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Network, IPv6Network

from kubespan_dp.netutil import IPAddress, IPNetwork

ULA_KUBESPAN = 0x02  # Talos's ULA space key for KubeSpan
ULA_SIDEROLINK = 0x03


def ula_prefix(cluster_id: str, space: int = ULA_KUBESPAN) -> IPv6Network:
    """Talos's ULA /64: bytes 16..31 of sha256(cluster id), byte 0 = 0xfd, byte 7 = space."""
    p = bytearray(hashlib.sha256(cluster_id.encode()).digest()[16:32])
    p[0] = 0xFD
    p[7] = space
    return IPv6Network((bytes(p[:8]) + bytes(8), 64))


def is_ula(value: IPAddress | IPNetwork, space: int) -> bool:
    """Talos's ULA check: an address, or a prefix inside one /64, of feature `space`."""
    if isinstance(value, (IPv4Network, IPv6Network)):
        if value.prefixlen < 64:
            return False  # wider than one feature's /64
        value = value.network_address
    return value.version == 6 and value.packed[0] == 0xFD and value.packed[7] == space
