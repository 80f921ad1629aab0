"""Announced addresses and endpoints: Talos's local-affiliate vector and the filter rules."""

from __future__ import annotations

from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from control import netlab
from control.config import load_config
from control.endpoints import (
    announced_endpoints,
    filter_ips,
    local_affiliate,
    node_addresses,
    system_addresses,
)
from control.identity import load_or_create_kubespan_identity
from tests import netns as nx

CLUSTER_ID = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
KS_ADDRESS = ip_address("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee")
# Talos controllers/cluster/local_affiliate_test.go
NODE_PREFIXES = [
    "172.20.0.2/24",
    "10.5.0.1/32",
    "192.168.192.168/24",
    "2001:123:4567::1/64",
    "2001:123:4567::1/128",
    KS_ADDRESS,
]
PUBLIC_IPS = [ip_address("1.1.1.1"), ip_address("2001:123:4567::1")]
FILTERS = ["0.0.0.0/0", "!192.168.0.0/16", "2001::/16"]
EXTRA = [("10.5.0.1", 51820), ("1.2.3.4", 5678)]
EXPECTED = [
    ("172.20.0.2", 51820),
    ("10.5.0.1", 51820),
    ("1.1.1.1", 51820),
    ("2001:123:4567::1", 51820),
    ("1.2.3.4", 5678),
]


def test_talos_vector_announced_addresses() -> None:
    assert node_addresses(NODE_PREFIXES) == [
        ip_address(a) for a in ("172.20.0.2", "10.5.0.1", "192.168.192.168", "2001:123:4567::1")
    ] + [KS_ADDRESS]


def test_talos_vector_endpoints_exact_order() -> None:
    got = announced_endpoints(
        node_addresses(NODE_PREFIXES),
        kubespan_address=KS_ADDRESS,
        public_ips=PUBLIC_IPS,
        filters=FILTERS,
        extra_endpoints=EXTRA,
    )
    assert got == EXPECTED


def test_talos_vector_through_config_and_identity(tmp_path: Path) -> None:
    text = f"""
version: v1alpha1
machine:
  network:
    kubespan:
      enabled: true
      advertiseKubernetesNetworks: true
      filters:
        endpoints: {FILTERS}
        excludeAdvertisedNetworks: [2001:123:4567::/64]
cluster:
  id: {CLUSTER_ID}
  secret: BVpg0EsnQ5vfvHvMN5Yc2+qyzbvJpLNokgdNqmYRxEU=
  discovery: {{enabled: true}}
---
apiVersion: v1alpha1
kind: KubeSpanEndpointsConfig
extraAnnouncedEndpoints: [10.5.0.1:51820, 1.2.3.4:5678]
---
apiVersion: v1alpha1
kind: KubeSpanPyConfig
podCIDRs: [10.244.1.0/24]
"""
    cfg = load_config(text)
    identity = load_or_create_kubespan_identity(tmp_path, cfg.cluster_id, "ea:71:1b:b2:cc:ee")
    assert identity.address.ip == KS_ADDRESS
    aff = local_affiliate(
        node_id="n1",
        hostname="example1",
        nodename="example1.com",
        addresses=node_addresses(NODE_PREFIXES),
        config=cfg,
        identity=identity,
        public_ips=PUBLIC_IPS,
    )
    assert aff.addresses[-1] == KS_ADDRESS and len(aff.addresses) == 5
    assert aff.kubespan is not None
    assert list(aff.kubespan.endpoints) == EXPECTED
    assert aff.kubespan.address == KS_ADDRESS
    assert aff.kubespan.public_key == identity.public_key_b64
    assert aff.kubespan.additional_addresses == (ip_network("10.244.1.0/24"),)
    assert aff.kubespan.exclude_advertised_networks == (ip_network("2001:123:4567::/64"),)
    # advertising off -> no additional networks; KubeSpan off -> no KubeSpan part
    off = load_config(
        text.replace("advertiseKubernetesNetworks: true", "advertiseKubernetesNetworks: false")
    )
    no_advertising = local_affiliate(
        node_id="n1", hostname="h", addresses=[], config=off, identity=identity
    ).kubespan
    assert no_advertising is not None and no_advertising.additional_addresses == ()
    assert (
        local_affiliate(
            node_id="n1", hostname="h", addresses=[], config=cfg, identity=None
        ).kubespan
        is None
    )


def test_no_filters_keeps_every_ip_and_custom_port() -> None:
    got = announced_endpoints(
        [ip_address("10.0.0.1"), KS_ADDRESS],
        kubespan_address=KS_ADDRESS,
        public_ips=[ip_address("10.0.0.1"), ip_address("203.0.113.9")],
        port=51821,
    )
    assert got == [("10.0.0.1", 51821), ("203.0.113.9", 51821)]


def test_sidero_link_and_unusable_addresses_dropped() -> None:
    addrs = node_addresses(
        [
            "127.0.0.1/8",
            "::1/128",
            "fe80::1/64",
            "224.0.0.1/32",
            "0.0.0.0/0",
            "10.0.0.1/8",
            "10.0.0.1/32",
            "10.244.0.5/24",
        ],
        exclude_networks=[ip_network("10.244.0.0/16")],
    )
    assert addrs == [ip_address("10.0.0.1")]
    # interface objects count as their address (they subclass the address types)
    assert node_addresses([ip_interface("10.0.0.1/24"), ip_interface("2001:db8::1/64")]) == [
        ip_address("10.0.0.1"),
        ip_address("2001:db8::1"),
    ]
    sidero = ip_address("fdae:41e4:649b:9303:60be:7e36:c270:3238")
    assert announced_endpoints([sidero, ip_address("10.0.0.1")], kubespan_address=None) == [
        ("10.0.0.1", 51820)
    ]


def test_filter_order_decides_output_order() -> None:
    ips = [ip_address(a) for a in ("10.0.0.1", "2001:db8::1", "192.168.1.1")]
    assert filter_ips(ips, ["::/0", "0.0.0.0/0"]) == [ips[1], ips[0], ips[2]]
    assert filter_ips(ips, ["!10.0.0.0/8", "10.0.0.1"]) == [
        ips[0]
    ]  # negation only removes what is in
    assert filter_ips(ips, ["0.0.0.0/0", "!10.0.0.1", "10.0.0.0/8"]) == [ips[2], ips[0]]
    assert filter_ips(ips, []) == []


@pytest.mark.netns
def test_system_addresses_in_own_namespace() -> None:
    with nx.Lab() as lab:
        ns = lab.netns("ep")
        # veth pairs inside the one namespace (no dummy module in this kernel)
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "p0")
        ns.run("ip", "link", "add", "d1", "type", "veth", "peer", "name", "p1")
        netlab.add_address(ns, "d0", "10.77.0.1/24")
        netlab.add_address(ns, "d0", "2001:db8:77::1/64")
        netlab.add_address(ns, "d1", "10.78.0.1/24")  # link down: not current
        ns.run("ip", "link", "set", "p0", "up")
        ns.run("ip", "link", "set", "d0", "up")
        got = netlab.wait_until(lambda: system_addresses(ns.name) or None, timeout=20)
        assert got == [ip_address("10.77.0.1"), ip_address("2001:db8:77::1")]
        ns.run("ip", "link", "set", "p1", "up")
        ns.run("ip", "link", "set", "d1", "up")
        assert netlab.wait_until(
            lambda: ip_address("10.78.0.1") in system_addresses(ns.name), timeout=20
        )
        assert system_addresses(ns.name, exclude_links=["d0", "d1", "p0", "p1"]) == []
