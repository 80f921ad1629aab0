"""The KubeSpan link's own address: the node's ULA address with its /64."""

from __future__ import annotations

from ipaddress import IPv6Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFA_F_NODAD = 0x02


class LinkError(RuntimeError):
    pass


def set_link_address(link: str, address: IPv6Interface) -> None:
    """Make `address` the link's only global address (idempotent; no DAD on a tunnel)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=link)
        if not found:
            raise LinkError(f"link {link!r} does not exist")
        index = found[0]
        present = False
        for entry in ipr.get_addr(index=index, family=10):
            ip = entry.get_attr("IFA_ADDRESS")
            prefixlen = entry["prefixlen"]
            if entry["scope"] != 0:
                continue  # link-local stays
            if ip == str(address.ip) and prefixlen == address.network.prefixlen:
                present = True
            else:
                ipr.addr("del", index=index, address=ip, prefixlen=prefixlen)
        if not present:
            try:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    flags=IFA_F_NODAD,
                )
            except NetlinkError as exc:
                raise LinkError(f"cannot add {address} to {link}: {exc}") from None
