"""control.wgport: datagrams from a port some other socket owns, through a real NAT."""

from __future__ import annotations

import socket

import pytest

from control import wgport
from control.netlab import add_address
from tests import netns


def test_datagram_header() -> None:
    assert wgport.udp_datagram(51820, 7, b"abc") == bytes.fromhex("ca6c0007000b0000") + b"abc"
    with pytest.raises(ValueError, match="ports"):
        wgport.udp_datagram(0, 7, b"")
    with pytest.raises(ValueError, match="over"):
        wgport.udp_datagram(1, 7, bytes(65_508))


@pytest.mark.netns
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_reply_to_punched_mapping_reaches_owner(lab: netns.Lab, family: int) -> None:
    """node -- router (masquerade) -- far. The node's "WireGuard" socket owns port
    40123; a raw datagram from that port opens the NAT mapping, and the far side's
    answer to the mapped address arrives on the owner's socket."""
    v6 = family == socket.AF_INET6
    node, router, far = lab.netns("node"), lab.netns("rtr"), lab.netns("far")
    n_dev, r_in = lab.veth(node, router)
    r_out, f_dev = lab.veth(router, far)
    inside, gw, outside, far_ip = (
        ("fd00:1::2", "fd00:1::1", "fd00:2::1", "fd00:2::2")
        if v6
        else ("10.1.0.2", "10.1.0.1", "10.2.0.1", "10.2.0.2")
    )
    plen = 64 if v6 else 24
    add_address(node, n_dev, f"{inside}/{plen}")
    add_address(router, r_in, f"{gw}/{plen}")
    add_address(router, r_out, f"{outside}/{plen}")
    add_address(far, f_dev, f"{far_ip}/{plen}")
    node.run("ip", "-6" if v6 else "-4", "route", "add", "default", "via", gw)
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    family_kw = "ip6" if v6 else "ip"
    router.run(
        "nft",
        f"add table {family_kw} nat; "
        f"add chain {family_kw} nat post {{ type nat hook postrouting priority 100; }}; "
        f"add rule {family_kw} nat post oifname {r_out} masquerade random",
    )

    owner = node.socket(family, socket.SOCK_DGRAM)
    owner.bind(("::" if v6 else "0.0.0.0", 40123))
    listener = far.socket(family, socket.SOCK_DGRAM)
    listener.bind((far_ip, 9999))
    listener.settimeout(10)
    try:
        with node.entered():
            wgport.send_from_port(40123, (far_ip, 9999), [b"punch", b"punch2"])
        data, mapped = listener.recvfrom(100)
        assert data == b"punch"
        assert mapped[0] == outside  # it went through the NAT ...
        assert listener.recvfrom(100) == (b"punch2", mapped)  # ... in one mapping
        listener.sendto(b"answer", mapped)
        owner.settimeout(10)
        data, source = owner.recvfrom(100)
        assert (data, source[0]) == (b"answer", far_ip)
    finally:
        owner.close()
        listener.close()


@pytest.mark.netns
def test_send_to_each_reports_failures_and_goes_on(lab: netns.Lab) -> None:
    """An unroutable destination is an error of its own; the next one still gets sent."""
    node, far = lab.netns("node"), lab.netns("far")
    n_dev, f_dev = lab.veth(node, far)
    add_address(node, n_dev, "10.3.0.1/24")
    add_address(far, f_dev, "10.3.0.2/24")
    listener = far.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("10.3.0.2", 9999))
    listener.settimeout(10)
    try:
        with node.entered():
            errors = wgport.send_to_each(
                40124, [("10.99.0.1", 9), ("10.3.0.2", 0), ("10.3.0.2", 9999)], b"x"
            )
        assert set(errors) == {("10.99.0.1", 9), ("10.3.0.2", 0)}
        assert isinstance(errors[("10.99.0.1", 9)], OSError)  # no route
        assert isinstance(errors[("10.3.0.2", 0)], ValueError)  # port 0
        data, source = listener.recvfrom(100)
        assert (data, source) == (b"x", ("10.3.0.1", 40124))
    finally:
        listener.close()
