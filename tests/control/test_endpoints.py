"""Announced addresses and endpoints: Talos's local-affiliate vector and the filter rules."""

from __future__ import annotations

import itertools
import logging
import random
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from control import netlab
from control.config import POD_CIDRS_HELP, load_config
from control.discovery.codec import decode_affiliate, encode_affiliate
from control.endpoints import (
    announced_endpoints,
    filter_ips,
    kubernetes_nodename,
    local_affiliate,
    node_addresses,
    sort_prefixes,
    system_addresses,
    system_hostname,
)
from control.identity import KubeSpanIdentity, load_or_create_kubespan_identity
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


# The NodeAddress the Talos test hands to LocalAffiliateController (its order as given).
NODE_IPS = [
    ip_address(a) for a in ("172.20.0.2", "10.5.0.1", "192.168.192.168", "2001:123:4567::1")
] + [KS_ADDRESS]


def test_talos_vector_node_addresses_sorted_v1() -> None:
    """The same prefixes as NodeAddressController orders them (v1, the default)."""
    assert node_addresses(NODE_PREFIXES) == [
        ip_address(a) for a in ("10.5.0.1", "172.20.0.2", "192.168.192.168", "2001:123:4567::1")
    ] + [KS_ADDRESS]


def test_talos_vector_endpoints_exact_order() -> None:
    got = announced_endpoints(
        NODE_IPS,
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
        addresses=NODE_PREFIXES,
        config=cfg,
        identity=identity,
        public_ips=PUBLIC_IPS,
    )
    assert aff.addresses[-1] == KS_ADDRESS and len(aff.addresses) == 5
    assert aff.kubespan is not None
    # end to end, the node addresses come sorted (v1): 10.5.0.1 before 172.20.0.2
    assert list(aff.kubespan.endpoints) == [EXPECTED[1], EXPECTED[0], *EXPECTED[2:]]
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
    assert node_addresses([ip_interface("2001:db8::1/64"), ip_interface("10.0.0.1/24")]) == [
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


# --- node address order: Talos's v1 (default) and v2 sort algorithms ----------------------

# internal/app/machined/pkg/controllers/network/internal/addressutil/compare_test.go:
# (input, v1 order, v2 order)
COMPARE_VECTORS = [
    (
        "10.3.4.1/24 10.3.4.5/24 10.3.4.5/32 1.2.3.4/26 192.168.35.11/24 192.168.36.10/24",
        "1.2.3.4/26 10.3.4.1/24 10.3.4.5/24 10.3.4.5/32 192.168.35.11/24 192.168.36.10/24",
        "1.2.3.4/26 10.3.4.5/32 10.3.4.1/24 10.3.4.5/24 192.168.35.11/24 192.168.36.10/24",
    ),
    (
        "2001:db8::1/64 2001:db8::1/128 2001:db8::2/64 2001:db8::2/128 2001:db8::3/64 "
        "2001:db8::3/128",
        "2001:db8::1/64 2001:db8::1/128 2001:db8::2/64 2001:db8::2/128 2001:db8::3/64 "
        "2001:db8::3/128",
        "2001:db8::1/128 2001:db8::2/128 2001:db8::3/128 2001:db8::1/64 2001:db8::2/64 "
        "2001:db8::3/64",
    ),
    (
        "fd01:cafe::5054:ff:fe1f:c7bd/64 fd01:cafe::f14c:9fa1:8496:557f/128 192.168.3.4/24 "
        "10.5.0.0/16",
        "10.5.0.0/16 192.168.3.4/24 fd01:cafe::5054:ff:fe1f:c7bd/64 "
        "fd01:cafe::f14c:9fa1:8496:557f/128",
        "10.5.0.0/16 192.168.3.4/24 fd01:cafe::f14c:9fa1:8496:557f/128 "
        "fd01:cafe::5054:ff:fe1f:c7bd/64",
    ),
]


@pytest.mark.parametrize("given, v1, v2", COMPARE_VECTORS, ids=["ipv4", "ipv6", "mixed"])
def test_talos_sort_vectors_from_every_input_order(given: str, v1: str, v2: str) -> None:
    for order in itertools.permutations(given.split()):
        assert [str(p) for p in sort_prefixes(order, "v1")] == v1.split()
        assert [str(p) for p in sort_prefixes(order, "v2")] == v2.split()


def test_talos_node_address_vectors() -> None:
    """node_address_test.go: what NodeAddressController makes of one up link's addresses."""
    filters_case = [
        "10.0.0.1/8",
        "25.3.7.9/32",
        "2001:470:6d:30e:4a62:b3ba:180b:b5b8/64",
        "127.0.0.1/8",
        "fdae:41e4:649b:9303:7886:731d:1ce9:4d4/128",  # SideroLink
        "fd54:616c:6f73::204f:5320:444e:531/128",  # Talos host DNS
    ]
    random.Random(1).shuffle(filters_case)
    current = ["10.0.0.1", "25.3.7.9", "2001:470:6d:30e:4a62:b3ba:180b:b5b8"]
    current.append("fdae:41e4:649b:9303:7886:731d:1ce9:4d4")
    assert node_addresses(filters_case) == [ip_address(a) for a in current]
    assert node_addresses(filters_case, [ip_network("10.0.0.0/8")]) == [
        ip_address(a) for a in current[1:]
    ]
    v2_case = [
        "1.2.3.4/26",
        "10.3.4.1/24",
        "10.3.4.5/24",
        "10.3.4.5/32",
        "192.168.35.11/24",
        "192.168.36.10/24",
        "127.0.0.1/8",
        "::1/128",
        "fd01:cafe::5054:ff:fe1f:c7bd/64",
        "fd01:cafe::f14c:9fa1:8496:557f/128",
    ]
    random.Random(2).shuffle(v2_case)
    v2 = ["1.2.3.4", "10.3.4.5", "10.3.4.1", "192.168.35.11", "192.168.36.10"]
    v2 += ["fd01:cafe::f14c:9fa1:8496:557f", "fd01:cafe::5054:ff:fe1f:c7bd"]
    assert node_addresses(v2_case, algorithm="v2") == [ip_address(a) for a in v2]
    overlapping = ["25.3.7.9/32", "10.96.0.2/32", "10.0.0.1/8"]
    assert node_addresses(overlapping, [ip_network("10.96.0.0/12")]) == [
        ip_address("10.0.0.1"),
        ip_address("25.3.7.9"),
    ]


IDENTITY_AND_SERVICE = """\
apiVersion: v1alpha1
kind: DiscoveryIdentityConfig
clusterID: 8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=
clusterSecret: BVpg0EsnQ5vfvHvMN5Yc2+qyzbvJpLNokgdNqmYRxEU=
---
apiVersion: v1alpha1
kind: DiscoveryServiceConfig
name: default
endpoint: http://10.0.0.1:3000"""

# A Kubernetes node: eth0, the pod network bridge and flannel, and kube-ipvs0 holding
# every ClusterIP; interface (kernel) order.
K8S_NODE_PREFIXES = [
    "192.168.10.20/24",  # eth0
    "2001:db8:10::20/64",
    "10.244.3.1/24",  # cni0
    "10.244.3.0/32",  # flannel.1
    "10.96.0.1/32",  # kube-ipvs0
    "10.96.0.10/32",
    "fd00:10:96::a/128",
    "192.168.10.5/32",  # a VIP on eth0
]


def k8s_config(*, sort: str = "v1", machine: str = "worker", extra: str = "") -> str:
    return f"""
version: v1alpha1
machine:
  type: {machine}
  features: {{nodeAddressSortAlgorithm: {sort}}}
---
{IDENTITY_AND_SERVICE}
---
apiVersion: v1alpha1
kind: KubeSpanConfig
enabled: true
---
apiVersion: v1alpha1
kind: KubeNetworkConfig
podSubnets: [10.244.0.0/16]
serviceSubnets: [10.96.0.0/12, "fd00:10:96::/112"]
{extra}"""


@pytest.fixture
def identity(tmp_path: Path) -> KubeSpanIdentity:
    cluster_id = load_config(IDENTITY_AND_SERVICE).cluster_id
    return load_or_create_kubespan_identity(tmp_path, cluster_id, "ea:71:1b:b2:cc:ee")


def endpoint_ips(config: str, addresses: list[str], identity: KubeSpanIdentity) -> list[str]:
    aff = local_affiliate(
        node_id="n",
        hostname="h",
        addresses=addresses,
        config=load_config(config),
        identity=identity,
    )
    assert aff.kubespan is not None
    return [host for host, _ in aff.kubespan.endpoints]


def test_kubernetes_addresses_are_neither_node_addresses_nor_endpoints(
    identity: KubeSpanIdentity,
) -> None:
    aff = local_affiliate(
        node_id="n",
        hostname="h",
        addresses=K8S_NODE_PREFIXES,
        config=load_config(k8s_config()),
        identity=identity,
    )
    node_ips = ["192.168.10.5", "192.168.10.20", "2001:db8:10::20"]  # v1: by address
    assert aff.addresses == tuple(ip_address(a) for a in node_ips)
    assert endpoint_ips(k8s_config(), K8S_NODE_PREFIXES, identity) == node_ips
    # our own pod CIDRs count too, even without a Kubernetes network section
    ours = load_config(
        f"{IDENTITY_AND_SERVICE}\n---\napiVersion: v1alpha1\nkind: KubeSpanPyConfig\n"
        "podCIDRs: [10.244.3.0/24]\n"
    )
    got = local_affiliate(
        node_id="n", hostname="h", addresses=K8S_NODE_PREFIXES, config=ours, identity=None
    ).addresses
    assert ip_address("10.244.3.1") not in got and ip_address("10.96.0.1") in got


def test_endpoint_order_follows_the_configured_sort(identity: KubeSpanIdentity) -> None:
    prefixes = ["192.168.10.20/24", "192.168.10.5/16", "192.168.10.20/32"]
    # v1: by address only
    assert endpoint_ips(k8s_config(), prefixes, identity) == ["192.168.10.5", "192.168.10.20"]
    # v2: 192.168.10.20/32 is the most specific; the /24 sits inside the /16
    v2 = endpoint_ips(k8s_config(sort="v2"), prefixes, identity)
    assert v2 == ["192.168.10.20", "192.168.10.5"]


# --- what the node says about itself: machine type, hostname, nodename, API port ------------


def test_worker_and_control_plane_metadata_round_trip(identity: KubeSpanIdentity) -> None:
    worker_cfg = load_config(k8s_config())
    worker = local_affiliate(
        node_id="w",
        hostname="Worker_1.example.com",
        addresses=[],
        config=worker_cfg,
        identity=identity,
    )
    assert (worker.hostname, worker.nodename, worker.machine_type) == (
        "Worker_1.example.com",
        "worker-1",
        "worker",
    )
    assert worker.control_plane_api_port is None
    cp_cfg = load_config(
        k8s_config(
            machine="controlplane",
            extra="---\napiVersion: v1alpha1\nkind: KubeAPIServerConfig\napiPort: 5443\n"
            "---\napiVersion: v1alpha1\nkind: KubeNodeConfig\nregisterWithFQDN: true\n",
        )
    )
    cp = local_affiliate(
        node_id="c",
        hostname="cp1.example.com",
        addresses=K8S_NODE_PREFIXES,
        config=cp_cfg,
        identity=identity,
    )
    assert (cp.nodename, cp.machine_type, cp.control_plane_api_port) == (
        "cp1.example.com",
        "controlplane",
        5443,
    )
    for aff in (worker, cp):  # through our codec and back, nothing lost
        assert aff.kubespan is not None
        assert decode_affiliate(encode_affiliate(aff), aff.kubespan.endpoints) == aff
    # "init" is a control plane too; explicit arguments win over the config
    init = local_affiliate(
        node_id="i",
        hostname="h",
        addresses=[],
        config=worker_cfg,
        identity=None,
        machine_type="init",
        nodename="n1",
    )
    assert (init.machine_type, init.nodename, init.control_plane_api_port) == ("init", "n1", 6443)


def test_kubernetes_nodename_as_talos() -> None:
    """internal/app/machined/pkg/controllers/k8s/internal/nodename/nodename_test.go"""
    for hostname, want in [
        ("foo", "foo"),
        ("foo_ია", "foo"),
        ("Node1", "node1"),
        ("MY_test_server_", "my-test-server"),
        ("123", "123"),
        ("-my-server-", "my-server"),
        ("foo.bar.tld.", "foo.bar.tld"),
    ]:
        assert kubernetes_nodename(hostname, fqdn=True) == want
    assert kubernetes_nodename("Foo.bar.tld") == "foo"  # the short name by default


def test_system_hostname_is_the_fqdn(tmp_path: Path) -> None:
    (tmp_path / "hostname").write_text("node1\n")
    (tmp_path / "domainname").write_text("(none)\n")
    assert system_hostname(tmp_path) == "node1"
    (tmp_path / "domainname").write_text("example.com\n")
    assert system_hostname(tmp_path) == "node1.example.com"
    assert system_hostname(tmp_path / "absent")  # falls back to gethostname()


def test_advertising_without_pod_cidrs_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    advertise = "enabled: true\nadvertiseKubernetesNetworks: true"
    cfg = load_config(k8s_config().replace("enabled: true", advertise))
    pod_cidrs = "---\napiVersion: v1alpha1\nkind: KubeSpanPyConfig\npodCIDRs: [10.244.3.0/24]\n"
    fixed = load_config(k8s_config(extra=pod_cidrs).replace("enabled: true", advertise))
    assert cfg.kubespan.advertise_kubernetes_networks and not cfg.local.pod_cidrs

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "control.endpoints"]

    caplog.set_level(logging.WARNING, logger="control.endpoints")
    for _ in range(3):
        local_affiliate(node_id="n", hostname="h", addresses=[], config=cfg, identity=None)
    assert len(warnings()) == 1 and POD_CIDRS_HELP in warnings()[0]
    # fixed (pod CIDRs configured), then broken again: warned again
    local_affiliate(node_id="n", hostname="h", addresses=[], config=fixed, identity=None)
    assert len(warnings()) == 1
    local_affiliate(node_id="n", hostname="h", addresses=[], config=cfg, identity=None)
    assert len(warnings()) == 2


@pytest.mark.netns
def test_system_addresses_in_own_namespace(tmp_path: Path) -> None:
    """Real links: the kernel's addresses with their prefixes, then what the node publishes
    from them: sorted, and without the pod/service addresses that cni0, flannel.1 and
    kube-ipvs0 carry on a Kubernetes node."""
    with nx.Lab() as lab:
        ns = lab.netns("ep")
        # veth pairs inside the one namespace (no dummy module in this kernel)
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "p0")
        ns.run("ip", "link", "add", "d1", "type", "veth", "peer", "name", "p1")
        ns.run("ip", "link", "add", "cni0", "type", "veth", "peer", "name", "ipvs")
        netlab.add_address(ns, "d0", "10.77.0.1/24")
        netlab.add_address(ns, "d0", "2001:db8:77::1/64")
        netlab.add_address(ns, "d1", "10.78.0.1/24")  # link down: not current
        netlab.add_address(ns, "cni0", "10.244.1.1/24")  # pod network gateway
        netlab.add_address(ns, "ipvs", "10.96.0.1/32")  # a ClusterIP (kube-ipvs0)
        netlab.add_address(ns, "ipvs", "10.96.0.10/32")
        for link in ("p0", "d0", "cni0", "ipvs"):
            ns.run("ip", "link", "set", link, "up")
        want = {
            ip_interface(a)
            for a in ("10.77.0.1/24", "2001:db8:77::1/64", "10.244.1.1/24", "10.96.0.1/32")
        }
        assert netlab.wait_until(lambda: want <= set(system_addresses(ns.name)), timeout=20)
        got = system_addresses(ns.name)
        assert ip_interface("10.78.0.1/24") not in got
        cfg = load_config(
            f"""
version: v1alpha1
cluster:
  network: {{podSubnets: [10.244.0.0/16], serviceSubnets: [10.96.0.0/12]}}
---
{IDENTITY_AND_SERVICE}
---
apiVersion: v1alpha1
kind: KubeSpanConfig
enabled: true
"""
        )
        identity = load_or_create_kubespan_identity(tmp_path, cfg.cluster_id, "ea:71:1b:b2:cc:ee")
        aff = local_affiliate(
            node_id="n", hostname="h", addresses=got, config=cfg, identity=identity
        )
        assert aff.addresses == (ip_address("10.77.0.1"), ip_address("2001:db8:77::1"))
        assert aff.kubespan is not None
        assert aff.kubespan.endpoints == (("10.77.0.1", 51820), ("2001:db8:77::1", 51820))
        ns.run("ip", "link", "set", "p1", "up")
        ns.run("ip", "link", "set", "d1", "up")
        assert netlab.wait_until(
            lambda: ip_interface("10.78.0.1/24") in system_addresses(ns.name), timeout=20
        )
        assert (
            system_addresses(ns.name, exclude_links=["d0", "d1", "p0", "p1", "cni0", "ipvs"]) == []
        )
