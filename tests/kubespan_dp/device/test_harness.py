"""The namespace harness itself, proven with wireguard-go on both sides."""

from __future__ import annotations

import pytest

from control import netlab
from tests import netns

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("outer", ["4", "6"])
def test_wireguard_go_pair_pings(lab: netns.Lab, outer: str) -> None:
    a, b = netns.build_pair(lab, "wireguard-go", "wireguard-go", outer=outer)
    netns.ping(a.ns, netns.INNER4[1])
    netns.ping(b.ns, netns.INNER6[0])
    dump = a.dump()
    assert dump[1][0] == b.public_key
    assert int(dump[1][4]) > 0  # latest handshake


def test_lab_cleans_up() -> None:
    with netns.Lab() as lab:
        a, b = netns.build_pair(lab, "wireguard-go", "wireguard-go")
        names = {a.ns.name, b.ns.name}
        sockets = [netns.uapi_path(a.ifname), netns.uapi_path(b.ifname)]
        assert all(p.exists() for p in sockets)
    assert not names & set(netlab.list_namespaces())
    assert not any(p.exists() for p in sockets)
