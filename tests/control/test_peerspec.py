"""Peer specs from affiliates: Talos's PeerSpecController vectors, with and without overlap."""

from __future__ import annotations

import logging
from ipaddress import IPv6Address, ip_address, ip_network

import pytest

from control.affiliate import Affiliate, IPNetwork, KubeSpanInfo
from control.peerspec import IPSet, PeerSpec, build_peer_specs


def net(text: str) -> IPNetwork:
    return ip_network(text, strict=False)


def prefixes(spec: PeerSpec) -> list[str]:
    return [str(p) for p in spec.allowed_ips]


def key_of(affiliate: Affiliate) -> str:
    assert affiliate.kubespan is not None
    return affiliate.kubespan.public_key


# Talos controllers/kubespan/peer_spec_test.go TestReconcile
A1 = Affiliate(
    "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
    hostname="foo.com",
    nodename="bar",
    machine_type="controlplane",
    addresses=(ip_address("192.168.3.4"),),
    kubespan=KubeSpanInfo(
        "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=",
        IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"),
        (net("10.244.3.1/24"), net("10.244.3.0/32")),
        (("10.0.0.2", 51820), ("192.168.3.4", 51820)),
        (net("10.244.3.128/25"),),
    ),
)
A2 = Affiliate(
    "9dwHNUViZlPlIervqX9Qo256RUhrfhgO0xBBnKcKl4F",
    hostname="worker-1",
    nodename="worker-1",
    addresses=(ip_address("192.168.3.5"),),
)
A3 = Affiliate(
    "xCnFFfxylOf9i5ynhAkt6ZbfcqaLDGKfIa3gwpuaxe7F",
    nodename="worker-2",
    addresses=(ip_address("192.168.3.6"),),
    kubespan=KubeSpanInfo(
        "mB6WlFOR66Jx5rtPMIpxJ3s4XHyer9NCzqWPP7idGRo",
        IPv6Address("fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67"),
        (net("10.244.4.1/24"),),
        (("192.168.3.6", 51820),),
    ),
)
LOCAL = Affiliate(
    "local-node",
    addresses=(ip_address("192.168.3.7"),),
    kubespan=KubeSpanInfo(
        "27E8I+ekrqT21cq2iW6+fDe+H7WBw6q9J7vqLCeswiM=",
        IPv6Address("fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67"),
        (net("10.244.5.1/24"),),
        (("192.168.3.7", 51820),),
    ),
)


def test_talos_reconcile_vector() -> None:
    specs = build_peer_specs([LOCAL, A3, A2, A1], local_node_id="local-node")
    assert [s.public_key for s in specs] == [key_of(A1), key_of(A3)]
    s1, s3 = specs
    assert str(s1.address) == "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"
    assert prefixes(s1) == [
        "10.244.3.0/25",
        "192.168.3.4/32",
        "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0/128",
    ]
    assert s1.endpoints == (("10.0.0.2", 51820), ("192.168.3.4", 51820))
    assert s1.label == "bar"
    assert prefixes(s3) == [
        "10.244.4.0/24",
        "192.168.3.6/32",
        "fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67/128",
    ]
    assert s3.endpoints == (("192.168.3.6", 51820),) and s3.label == "worker-2"


def test_talos_overlap_vector(caplog: pytest.LogCaptureFixture) -> None:
    b1 = Affiliate(
        "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
        nodename="bar",
        kubespan=KubeSpanInfo(
            "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=",
            IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"),
            (net("10.244.3.1/24"), net("10.244.3.0/32")),
        ),
    )
    b2 = Affiliate(
        "9dwHNUViZlPlIervqX9Qo256RUhrfhgO0xBBnKcKl4F",
        nodename="worker-1",
        kubespan=KubeSpanInfo(
            "Zr5ewpUm2Ywo1c+/59WFKIBjZ3c/nVbIWsT5elbjwCU=",
            IPv6Address("fd50:8d60:4238:6302:f857:23ff:fe21:d1e1"),
            (net("10.244.2.0/23"), net("192.168.3.0/24")),
        ),
    )
    with caplog.at_level(logging.WARNING, logger="control.peerspec"):
        s1, s2 = build_peer_specs([b2, b1], local_node_id="me")
    assert prefixes(s1) == ["10.244.3.0/24", "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0/128"]
    assert prefixes(s2) == [
        "10.244.2.0/24",
        "192.168.3.0/24",
        "fd50:8d60:4238:6302:f857:23ff:fe21:d1e1/128",
    ]
    assert "peer address overlap" in caplog.text and key_of(b2) in caplog.text


def test_without_overlap_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="control.peerspec"):
        build_peer_specs([A1, A3], local_node_id="x")
    assert caplog.text == ""


def test_overlap_removing_everything_warns(caplog: pytest.LogCaptureFixture) -> None:
    k = IPv6Address("fd00::1")
    first = Affiliate("a", kubespan=KubeSpanInfo("KA", k, (net("10.0.0.0/8"),)))
    second = Affiliate("b", addresses=(ip_address("10.1.1.1"),), kubespan=KubeSpanInfo("KB", k))
    with caplog.at_level(logging.WARNING, logger="control.peerspec"):
        _, s2 = build_peer_specs([first, second], local_node_id="x")
    assert s2.allowed_ips == ()
    assert "conflict resolution removed all ranges" in caplog.text


def test_duplicate_public_key_keeps_first(caplog: pytest.LogCaptureFixture) -> None:
    dup = Affiliate("zzz", kubespan=KubeSpanInfo(key_of(A1), IPv6Address("fd00::9")))
    with caplog.at_level(logging.WARNING, logger="control.peerspec"):
        specs = build_peer_specs([dup, A1], local_node_id="x")
    assert len(specs) == 1 and specs[0].label == "bar"
    assert "duplicate peer public key" in caplog.text


def test_ipset_operations() -> None:
    s = IPSet()
    s.add_prefix(net("10.0.0.0/24"))
    s.add_prefix(net("10.0.1.0/24"))
    s.add_ip(ip_address("2001:db8::1"))
    assert [str(p) for p in s.prefixes()] == ["10.0.0.0/23", "2001:db8::1/128"]
    s.remove_prefix(net("10.0.0.128/25"))
    assert [str(p) for p in s.prefixes()] == ["10.0.0.0/25", "10.0.1.0/24", "2001:db8::1/128"]
    other = IPSet()
    other.add_ip(ip_address("10.0.1.7"))
    assert s.overlaps(other) and not other.overlaps(IPSet())
    s.remove_set(other)
    assert not s.overlaps(other)
    assert s.ranges()[0] == "10.0.0.0-10.0.0.127"
