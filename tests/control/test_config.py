"""Machine config loading: Talos samples, defaults, and every validation message."""

from __future__ import annotations

import os
import textwrap
from ipaddress import ip_network
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from control.config import (
    KUBESPAN_NEEDS_DISCOVERY,
    ConfigError,
    DiscoveryService,
    DiscoverySettings,
    MachineConfig,
    load_config,
)

TALOS = Path(__file__).resolve().parents[1] / "data" / "talos"
SECRET = "BVpg0EsnQ5vfvHvMN5Yc2+qyzbvJpLNokgdNqmYRxEU="
NEEDS_DISCOVERY = KUBESPAN_NEEDS_DISCOVERY
NEEDS_ID = (
    "cluster discovery requires a cluster id (.cluster.id or a DiscoveryIdentityConfig document)"
)
NEEDS_SECRET = (
    "cluster discovery requires a cluster secret "
    "(.cluster.secret or a DiscoveryIdentityConfig document)"
)


def sample(name: str) -> Path:
    """A Talos sample from tests/data/talos (see its README for where each comes from)."""
    for folder in (TALOS, TALOS / "network", TALOS / "cluster", TALOS / "v1.14"):
        if (folder / name).is_file():
            return folder / name
    raise AssertionError(f"Talos sample config missing: {name} (expected in {TALOS})")


def base(kubespan: str = "enabled: true", discovery: str = "enabled: true", extra: str = "") -> str:
    """A minimal v1alpha1 document; pieces are indented into place."""
    return (
        textwrap.dedent("""\
        version: v1alpha1
        machine:
          network:
            kubespan:
        {ks}
        cluster:
          id: 8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=
          secret: {secret}
          discovery:
        {disc}
        """).format(
            ks=textwrap.indent(kubespan, " " * 6),
            disc=textwrap.indent(discovery, " " * 4),
            secret=SECRET,
        )
        + extra
    )


def problems(*sources: str | os.PathLike[str]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(*sources)
    return info.value.problems


# --- the Talos samples ------------------------------------------------------------------


def test_worker_sample_loads_with_talos_defaults() -> None:
    cfg = load_config(sample("worker.yaml"))
    assert cfg.cluster_id == "jW8IQKoSCDbhlCNm5K59er5jawHVIechsTuLNZ2_0Z8="
    assert len(cfg.secret_bytes) == 32
    ks = cfg.kubespan
    assert ks.enabled and ks.mtu == 1420 and ks.force_routing
    assert not ks.advertise_kubernetes_networks and not ks.harvest_extra_endpoints
    assert ks.endpoint_filters is None and ks.exclude_advertised_networks == ()
    assert (
        cfg.discovery.enabled and cfg.discovery.service_active and cfg.discovery.kubernetes_enabled
    )
    assert cfg.discovery_endpoint == "https://discovery.talos.dev/"
    assert cfg.discovery_target() == ("discovery.talos.dev:443", False)
    assert cfg.local.listen_port == 51820 and cfg.local.link_name == "kubespan"
    assert cfg.local.wireguard_mode == "auto"


def test_worker_sample_with_endpoints_document() -> None:
    cfg = load_config(sample("worker.yaml"), sample("kubespanendpointsconfig.yaml"))
    assert cfg.kubespan.extra_announced_endpoints == (("3.4.5.6", 123), ("10.11.12.13", 456))


def test_standalone_kubespan_document_with_cluster_from_v1alpha1() -> None:
    """Newer Talos layout: KubeSpan settings in their own document."""
    worker = yaml.safe_load(sample("worker.yaml").read_text())
    del worker["machine"]["network"]["kubespan"]
    cfg = load_config(
        yaml.safe_dump(worker),
        sample("kubespanconfig.yaml"),
        sample("kubespanendpointsconfig.yaml"),
    )
    assert cfg.kubespan.enabled and cfg.kubespan.mtu == 1420
    assert cfg.kubespan.exclude_advertised_networks == (ip_network("2007::/64"),)
    assert cfg.kubespan.extra_announced_endpoints == (("3.4.5.6", 123), ("10.11.12.13", 456))


def test_kubespan_document_conflicts_with_v1alpha1_section() -> None:
    assert problems(sample("worker.yaml"), sample("kubespanconfig.yaml")) == [
        ("KubeSpanConfig", "kubespan is already configured in v1alpha1 machine.network.kubespan")
    ]


def test_kubespan_document_alone_lacks_cluster_identity_and_discovery() -> None:
    assert problems(sample("kubespanconfig.yaml")) == [
        ("cluster.id", NEEDS_ID),
        ("cluster.secret", NEEDS_SECRET),
        ("DiscoveryServiceConfig", NEEDS_DISCOVERY),
    ]


OTHER_NETWORK_DOCUMENTS = sorted(
    p.name for p in (TALOS / "network").glob("*.yaml") if not p.name.startswith("kubespan")
)


@pytest.mark.parametrize("name", OTHER_NETWORK_DOCUMENTS)
def test_current_talos_network_documents_we_do_not_own_are_ignored(name: str) -> None:
    """A real config carries many other documents (links, bonds, routes...): they load untouched."""
    alone = load_config(sample("worker.yaml"))
    cfg = load_config(sample("worker.yaml"), sample(name))
    assert cfg == alone


def test_samples_are_all_there() -> None:
    assert len(OTHER_NETWORK_DOCUMENTS) >= 20
    assert {p.name for p in (TALOS / "cluster").glob("*.yaml")} == {
        "discoveryidentityconfig.yaml",
        "discoveryserviceconfig.yaml",
        "discoveryserviceconfig-multiple.yaml",
    }


def test_guide_spelling_of_endpoints_kind_is_accepted() -> None:
    doc = (
        "---\napiVersion: v1alpha1\nkind: KubespanEndpointsConfig\n"
        "extraAnnouncedEndpoints: ['[2001:db8::1]:51820']\n"
    )
    cfg = load_config(base() + doc)
    assert cfg.kubespan.extra_announced_endpoints == (("2001:db8::1", 51820),)


# --- Talos 1.14+: discovery and identity documents ---------------------------------------

TALOS_DEFAULT_SERVICE = DiscoveryService(
    "default", "https://discovery.talos.dev/", "discovery.talos.dev:443", False
)
IDENTITY_DOC = sample("discoveryidentityconfig.yaml")
KUBESPAN_ON = "---\napiVersion: v1alpha1\nkind: KubeSpanConfig\nenabled: true\n"


def doc(kind: str, **fields: object) -> str:
    return "---\n" + yaml.safe_dump({"apiVersion": "v1alpha1", "kind": kind, **fields})


def test_talosctl_1_14_worker_config_with_kubespan_loads() -> None:
    """What `talosctl gen config` writes since 1.14 (no cluster.id/secret/discovery, documents
    instead), plus the KubeSpanConfig document `--with-kubespan` adds."""
    cfg = load_config(sample("base-worker.yaml"), sample("kubespanconfig.yaml"))
    assert cfg.cluster_id == "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w="
    assert cfg.cluster_secret == "pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic="
    assert len(cfg.secret_bytes) == 32
    assert cfg.kubespan.enabled and cfg.discovery.service_active
    assert cfg.discovery_services == (TALOS_DEFAULT_SERVICE,)
    # the single-service view the agent used so far: the first service
    assert cfg.discovery_target() == ("discovery.talos.dev:443", False)
    assert cfg.discovery_endpoint == "https://discovery.talos.dev/"
    # the Kubernetes documents: what shapes the published node data
    assert cfg.node.machine_type == "worker" and not cfg.node.control_plane
    assert cfg.node.pod_subnets == (ip_network("10.244.0.0/16"),)
    assert cfg.node.service_subnets == (ip_network("10.96.0.0/12"),)
    assert cfg.kubernetes_networks == (ip_network("10.244.0.0/16"), ip_network("10.96.0.0/12"))
    # without KubeSpanConfig the same file is a valid config with KubeSpan off
    assert not load_config(sample("base-worker.yaml")).kubespan.enabled


def test_talosctl_1_14_control_plane_configs() -> None:
    base = load_config(sample("base-controlplane.yaml"), KUBESPAN_ON)
    assert base.node.machine_type == "controlplane" and base.node.control_plane
    assert base.node.api_server_port == 6443  # KubeAPIServerConfig without apiPort
    assert base.discovery_services == (TALOS_DEFAULT_SERVICE,)
    overrides = load_config(sample("overrides-controlplane.yaml"), KUBESPAN_ON)
    assert overrides.node.api_server_port == 5443


def test_several_discovery_services_in_document_order() -> None:
    cfg = load_config(IDENTITY_DOC, sample("discoveryserviceconfig-multiple.yaml"), KUBESPAN_ON)
    assert cfg.cluster_id == "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="
    assert cfg.discovery_services == (
        DiscoveryService(
            "primary", "https://discovery.talos.dev/", "discovery.talos.dev:443", False
        ),
        # Talos accepts a path here (it dials host:port only)
        DiscoveryService(
            "secondary",
            "https://discovery-secondary.talos.dev/path",
            "discovery-secondary.talos.dev:443",
            False,
        ),
        # grpc:// is TLS too: only http:// is plaintext (Talos's NormalizeEndpoint)
        DiscoveryService(
            "grpc-endpoint",
            "grpc://discovery-grpc.talos.dev:6443",
            "discovery-grpc.talos.dev:6443",
            False,
        ),
    )
    assert cfg.discovery_target() == ("discovery.talos.dev:443", False)


@pytest.mark.parametrize(
    "endpoint, target, insecure",
    [
        ("http://10.0.0.1", "10.0.0.1:80", True),
        ("http://10.0.0.1:3000/", "10.0.0.1:3000", True),
        ("https://d.example", "d.example:443", False),
        ("grpc://d.example", "d.example:443", False),
        ("http://[fd00::1]:3000", "[fd00::1]:3000", True),
        ("https://[2001:db8::1]/", "[2001:db8::1]:443", False),
    ],
)
def test_discovery_service_endpoint_normalised_as_talos(
    endpoint: str, target: str, insecure: bool
) -> None:
    cfg = load_config(
        IDENTITY_DOC, doc("DiscoveryServiceConfig", name="s", endpoint=endpoint), KUBESPAN_ON
    )
    assert cfg.discovery_services == (DiscoveryService("s", endpoint, target, insecure),)


def test_our_discovery_endpoint_replaces_every_service() -> None:
    ours = doc("KubeSpanPyConfig", discoveryEndpoint="http://10.0.0.9:3000")
    cfg = load_config(
        IDENTITY_DOC, sample("discoveryserviceconfig-multiple.yaml"), KUBESPAN_ON, ours
    )
    assert cfg.discovery_services == (
        DiscoveryService("discoveryEndpoint", "http://10.0.0.9:3000", "10.0.0.9:3000", True),
    )
    assert cfg.discovery_target() == ("10.0.0.9:3000", True)


def test_legacy_discovery_is_one_service_named_legacy() -> None:
    cfg = load_config(sample("worker.yaml"))
    assert cfg.discovery_services == (
        DiscoveryService(
            "legacy", "https://discovery.talos.dev/", "discovery.talos.dev:443", False
        ),
    )
    off = load_config(base(kubespan="enabled: false", discovery="enabled: false"))
    assert off.discovery_services == () and not off.discovery.service_active


def test_documents_conflict_with_their_v1alpha1_forms() -> None:
    """As Talos: any .cluster.discovery block conflicts with a DiscoveryServiceConfig, and
    .cluster.id/.cluster.secret with a DiscoveryIdentityConfig."""
    assert problems(sample("worker.yaml"), sample("discoveryserviceconfig-multiple.yaml")) == [
        (
            f"DiscoveryServiceConfig/{name}",
            "discovery service is already configured in .cluster.discovery of the v1alpha1 config",
        )
        for name in ("primary", "secondary", "grpc-endpoint")
    ]
    empty_block = "version: v1alpha1\ncluster: {discovery: {}}\n"  # mere presence conflicts
    got = problems(empty_block, IDENTITY_DOC, sample("discoveryserviceconfig.yaml"))
    assert [p for p, _ in got] == ["DiscoveryServiceConfig/primary"]
    assert problems(sample("worker.yaml"), IDENTITY_DOC) == [
        (
            "DiscoveryIdentityConfig",
            "cluster identity is already configured in .cluster.id/.cluster.secret "
            "of the v1alpha1 config",
        )
    ]


def test_bad_discovery_documents() -> None:
    got = problems(
        doc("DiscoveryServiceConfig", name="a", endpoint="ftp://d.example/"),
        doc("DiscoveryServiceConfig", name="b", endpoint="https:///nohost"),
        doc("DiscoveryServiceConfig", name="c"),
        doc("DiscoveryServiceConfig", endpoint="https://d.example/"),
        doc("DiscoveryServiceConfig", name="e", endpoint="//d.example:443"),
        doc("DiscoveryServiceConfig", name="f", endpoint="https://d.example:99999/"),
        doc("DiscoveryServiceConfig", name="a", endpoint="https://d.example/"),
        doc("DiscoveryServiceConfig", name="g", endpoint="https://d.example/", extra=1),
        doc("DiscoveryIdentityConfig", clusterSecret="c2hvcnQ="),
        KUBESPAN_ON,
    )
    assert got[:5] == [
        (
            "DiscoveryServiceConfig/a.endpoint",
            "discovery service endpoint is invalid: "
            "endpoint scheme must be http://, https:// or grpc://",
        ),
        (
            "DiscoveryServiceConfig/b.endpoint",
            "discovery service endpoint is invalid: endpoint host is required",
        ),
        ("DiscoveryServiceConfig/c.endpoint", "endpoint is required"),
        ("DiscoveryServiceConfig.name", "name is required"),
        (
            "DiscoveryServiceConfig/e.endpoint",
            "discovery service endpoint is invalid: endpoint scheme is required",
        ),
    ]
    assert got[5][0] == "DiscoveryServiceConfig/f.endpoint" and "port" in got[5][1].lower()
    assert got[6:] == [
        ("DiscoveryServiceConfig/a", "duplicate DiscoveryServiceConfig/a document"),
        ("DiscoveryServiceConfig/g.extra", "unknown key"),
        ("DiscoveryIdentityConfig.clusterID", "clusterID is required"),
        (
            "DiscoveryIdentityConfig.clusterSecret",
            "cluster secret must be base64 of 32 bytes: decodes to 5 bytes",
        ),
    ]


def test_identity_document_alone_and_duplicated() -> None:
    cfg = load_config(IDENTITY_DOC)
    assert cfg.cluster_id == "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="
    assert not cfg.discovery.service_active and not cfg.kubespan.enabled
    assert problems(IDENTITY_DOC, IDENTITY_DOC) == [
        ("DiscoveryIdentityConfig", "duplicate DiscoveryIdentityConfig document")
    ]
    # KubeSpan with an identity but no service
    assert problems(IDENTITY_DOC, KUBESPAN_ON) == [("DiscoveryServiceConfig", NEEDS_DISCOVERY)]


def test_readme_talos_example_loads() -> None:
    """The README's current-style Talos config, with its local.yaml, is what it says."""
    readme = (TALOS.parents[2] / "README.md").read_text()
    block = readme.split("# worker.yaml, from talosctl (abridged)\n", 1)[1].split("```", 1)[0]
    local = "apiVersion: v1alpha1\nkind: KubeSpanPyConfig\npodCIDRs: [10.244.7.0/24]\n"
    assert f"printf '{local.replace(chr(10), chr(92) + 'n')}' > local.yaml" in readme
    cfg = load_config(block, local)
    assert cfg.kubespan.enabled and cfg.discovery_services == (TALOS_DEFAULT_SERVICE,)
    assert cfg.cluster_id == "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w="
    assert cfg.kubernetes_networks == tuple(
        ip_network(n) for n in ("10.244.0.0/16", "10.96.0.0/12", "10.244.7.0/24")
    )


# --- node data: machine type, API server port, Kubernetes networks, sort order --------------


def test_node_settings_from_v1alpha1() -> None:
    machine = (
        "machine:\n  type: controlplane\n  features: {nodeAddressSortAlgorithm: v2}\n"
        "  kubelet: {registerWithFQDN: true}\n"
    )
    cluster = (
        "cluster:\n  controlPlane: {localAPIServerPort: 7443}\n"
        "  network: {podSubnets: [10.32.0.0/12, 'fd00:10::/56'], serviceSubnets: []}\n"
    )
    text = base().replace("machine:\n", machine, 1).replace("cluster:\n", cluster, 1)
    node = load_config(text).node
    assert (node.machine_type, node.api_server_port, node.register_with_fqdn) == (
        "controlplane",
        7443,
        True,
    )
    assert node.address_sort == "v2" and node.control_plane
    assert node.pod_subnets == (ip_network("10.32.0.0/12"), ip_network("fd00:10::/56"))
    assert node.service_subnets == (ip_network("10.96.0.0/12"),)  # Talos's default
    # no cluster.network: no Kubernetes networks; machine.type "join" is a worker
    plain = load_config(base().replace("machine:\n", "machine:\n  type: join\n", 1))
    assert plain.node.machine_type == "worker" and plain.kubernetes_networks == ()
    assert plain.node.api_server_port == 6443 and plain.node.address_sort == "v1"


def test_kubernetes_documents_win_and_pod_cidrs_count_as_kubernetes_networks() -> None:
    text = base().replace(
        "cluster:\n", "cluster:\n  network: {podSubnets: [10.1.0.0/16]}\n", 1
    ) + "".join(
        (
            doc("KubeNetworkConfig", podSubnets=["10.2.0.0/16"], serviceSubnets=["10.3.0.0/16"]),
            doc("KubeAPIServerConfig", apiPort=8443, image="x"),
            doc("KubeNodeConfig", registerWithFQDN=True, nodeIP={}),
            doc("KubeSpanPyConfig", podCIDRs=["10.2.7.0/24", "10.9.0.0/24"]),
        )
    )
    cfg = load_config(text)
    assert cfg.node.api_server_port == 8443 and cfg.node.register_with_fqdn
    assert cfg.kubernetes_networks == tuple(
        ip_network(n) for n in ("10.2.0.0/16", "10.3.0.0/16", "10.2.7.0/24", "10.9.0.0/24")
    )


def test_bad_node_settings() -> None:
    text = base().replace(
        "machine:\n",
        "machine:\n  type: master\n  features: {nodeAddressSortAlgorithm: v3}\n",
        1,
    ) + doc("KubeNetworkConfig", podSubnets=["10.0.0.0"], serviceSubnets="x")
    assert problems(text) == [
        ("machine.type", "unknown machine type 'master'"),
        (
            "machine.features.nodeAddressSortAlgorithm",
            "invalid node address sort algorithm: 'v3' (expected v1 or v2)",
        ),
        (
            "KubeNetworkConfig.podSubnets[0]",
            "subnet is not valid: '10.0.0.0' (missing /prefix-length)",
        ),
        ("KubeNetworkConfig.serviceSubnets", "expected a list, got string"),
    ]


# --- our document and the full field set ------------------------------------------------------


def test_all_fields_and_our_document() -> None:
    ks = textwrap.dedent("""\
        enabled: true
        advertiseKubernetesNetworks: true
        allowDownPeerBypass: true
        harvestExtraEndpoints: true
        mtu: 1500
        filters:
          endpoints: ["0.0.0.0/0", "!192.168.0.0/16", "2001::/16", "10.1.2.3"]
          excludeAdvertisedNetworks: [10.244.3.128/25]""")
    disc = "enabled: true\nregistries:\n  kubernetes: {disabled: true}\n  service: {endpoint: 'https://d.example:3000/'}"
    ours = textwrap.dedent("""\
        ---
        apiVersion: v1alpha1
        kind: KubeSpanPyConfig
        listenPort: 51821
        wireguardMode: userspace
        podCIDRs: [10.244.1.0/24, "fd00:10::/64"]
        stateDir: /tmp/x
        linkName: ks0
        discoveryEndpoint: http://10.0.0.1:3001
        """)
    cfg = load_config(base(ks, disc) + ours)
    k = cfg.kubespan
    assert (
        k.advertise_kubernetes_networks,
        k.allow_down_peer_bypass,
        k.harvest_extra_endpoints,
    ) == (True,) * 3
    assert not k.force_routing and k.mtu == 1500
    assert k.endpoint_filters == ("0.0.0.0/0", "!192.168.0.0/16", "2001::/16", "10.1.2.3")
    assert k.exclude_advertised_networks == (ip_network("10.244.3.128/25"),)
    assert not cfg.discovery.kubernetes_enabled
    assert cfg.discovery.service_endpoint == "https://d.example:3000/"
    loc = cfg.local
    assert (loc.listen_port, loc.wireguard_mode, loc.state_dir, loc.link_name) == (
        51821,
        "userspace",
        "/tmp/x",
        "ks0",
    )
    assert loc.pod_cidrs == (ip_network("10.244.1.0/24"), ip_network("fd00:10::/64"))
    assert cfg.discovery_target() == ("10.0.0.1:3001", True)


def test_other_talos_sections_and_kinds_are_ignored() -> None:
    extra = "---\napiVersion: v1alpha1\nkind: HostnameConfig\nwhatever: {deep: [1]}\n"
    text = base().replace("machine:\n", "machine:\n  install: {disk: /dev/sda, bogus: 1}\n") + extra
    assert load_config(text).kubespan.enabled


def test_normalize_endpoint() -> None:
    def target(url: str) -> tuple[str, bool]:
        return MachineConfig(discovery=DiscoverySettings(service_endpoint=url)).discovery_target()

    assert target("http://[fd00::1]:3000/") == ("[fd00::1]:3000", True)
    assert target("http://host") == ("host:80", True)


# --- every validation problem, with its path ------------------------------------------------


@pytest.mark.parametrize(
    "config, path, message",
    [
        pytest.param(
            base("enabled: true\nmtu: 1279"),
            "machine.network.kubespan.mtu",
            "kubespan link MTU must be at least 1280",
            id="mtu-below-minimum",
        ),
        pytest.param(
            base(discovery="enabled: false"),
            "cluster.discovery.enabled",
            NEEDS_DISCOVERY,
            id="kubespan-without-discovery",
        ),
        pytest.param(
            base(discovery="enabled: true\nregistries:\n  service:\n    disabled: true"),
            "cluster.discovery.registries.service.disabled",
            NEEDS_DISCOVERY,
            id="kubespan-with-service-registry-disabled",
        ),
        pytest.param(
            base(
                discovery="enabled: true\nregistries: {service: {endpoint: 'https://d.example/api'}}"
            ),
            "cluster.discovery.registries.service.endpoint",
            "cluster discovery service path should be empty",
            id="service-endpoint-with-path",
        ),
    ],
)
def test_single_problem(config: str, path: str, message: str) -> None:
    assert problems(config) == [(path, message)]


def test_malformed_filter_cidr_and_extra_endpoint() -> None:
    ks = (
        "enabled: true\nfilters:\n  endpoints: ['0.0.0.0/0', '!300.1.0.0/16', 'nope']\n"
        "  excludeAdvertisedNetworks: ['10.0.0.0/33', '10.0.0.1']"
    )
    eps = (
        "---\napiVersion: v1alpha1\nkind: KubeSpanEndpointsConfig\n"
        "extraAnnouncedEndpoints:"
        " ['1.2.3.4', '1.2.3.4:0', '::1:80', '[1.2.3.4]:5', '1.2.3.4:51820']\n"
    )
    got = problems(base(ks) + eps)
    paths = [p for p, _ in got]
    assert paths == [
        "machine.network.kubespan.filters.endpoints[1]",
        "machine.network.kubespan.filters.endpoints[2]",
        "machine.network.kubespan.filters.excludeAdvertisedNetworks[0]",
        "machine.network.kubespan.filters.excludeAdvertisedNetworks[1]",
        "KubeSpanEndpointsConfig.extraAnnouncedEndpoints[0]",
        "KubeSpanEndpointsConfig.extraAnnouncedEndpoints[1]",
        "KubeSpanEndpointsConfig.extraAnnouncedEndpoints[2]",
        "KubeSpanEndpointsConfig.extraAnnouncedEndpoints[3]",
    ]
    assert got[0][1] == "KubeSpan endpoint filter is not valid: '!300.1.0.0/16'"
    assert got[2][1].startswith(
        "KubeSpan exclude advertised networks filter is not valid: '10.0.0.0/33'"
    )
    assert got[3][1].startswith(
        "KubeSpan exclude advertised networks filter is not valid: '10.0.0.1'"
    )
    assert got[4][1].startswith("extra announced endpoint is not valid: '1.2.3.4'")
    assert "port '0' is not in 1-65535" in got[5][1]


@pytest.mark.parametrize(
    "secret, message",
    [
        ("not base64!!", "cluster secret must be base64 of 32 bytes: not valid base64"),
        ("c2hvcnQ=", "cluster secret must be base64 of 32 bytes: decodes to 5 bytes"),
    ],
)
def test_bad_secret(secret: str, message: str) -> None:
    assert problems(base().replace(SECRET, secret)) == [("cluster.secret", message)]


def test_unknown_keys_in_owned_sections() -> None:
    ks = "enabled: true\nmtus: 1400\nfilters: {endpoint: []}"
    disc = (
        "enabled: true\nregistry: {}\nregistries: {service: {url: x}, kubernetes: {enabled: true}}"
    )
    ours = "---\napiVersion: v1alpha1\nkind: KubeSpanPyConfig\nlistenport: 1\n"
    eps = "---\napiVersion: v1alpha1\nkind: KubeSpanEndpointsConfig\nextra: []\n"
    got = problems(base(ks, disc) + ours + eps)
    assert sorted(got) == sorted(
        [
            ("machine.network.kubespan.mtus", "unknown key"),
            ("machine.network.kubespan.filters.endpoint", "unknown key"),
            ("cluster.discovery.registry", "unknown key"),
            ("cluster.discovery.registries.service.url", "unknown key"),
            ("cluster.discovery.registries.kubernetes.enabled", "unknown key"),
            ("KubeSpanPyConfig.listenport", "unknown key"),
            ("KubeSpanEndpointsConfig.extra", "unknown key"),
        ]
    )


def test_wrong_types() -> None:
    ks = (
        "enabled: 'yes'\nmtu: '1420'\n"
        "filters: {endpoints: '0.0.0.0/0', excludeAdvertisedNetworks: [1]}"
    )
    disc = "enabled: true\nregistries: {service: []}"
    got = problems(base(ks, disc).replace(f"secret: {SECRET}", "secret: 12"))
    assert sorted(got) == sorted(
        [
            ("machine.network.kubespan.enabled", "expected a boolean, got string"),
            ("machine.network.kubespan.mtu", "expected an integer, got string"),
            ("machine.network.kubespan.filters.endpoints", "expected a list, got string"),
            (
                "machine.network.kubespan.filters.excludeAdvertisedNetworks[0]",
                "expected a string, got integer",
            ),
            ("cluster.secret", "expected a string, got integer"),
            ("cluster.discovery.registries.service", "expected a mapping, got list"),
            ("cluster.secret", NEEDS_SECRET),
        ]
    )


def test_our_document_values() -> None:
    ours = textwrap.dedent("""\
        ---
        apiVersion: v1alpha1
        kind: KubeSpanPyConfig
        listenPort: 70000
        wireguardMode: fast
        podCIDRs: [10.244.1.0]
        stateDir: ""
        linkName: this-name-is-too-long
        discoveryEndpoint: ftp://x/
        """)
    assert problems(base() + ours) == [
        ("KubeSpanPyConfig.listenPort", "listen port must be in 1-65535, got 70000"),
        ("KubeSpanPyConfig.wireguardMode", "must be one of auto, kernel, userspace, got 'fast'"),
        (
            "KubeSpanPyConfig.podCIDRs[0]",
            "pod CIDR is not valid: '10.244.1.0' (missing /prefix-length)",
        ),
        ("KubeSpanPyConfig.stateDir", "must not be empty"),
        (
            "KubeSpanPyConfig.linkName",
            "invalid interface name 'this-name-is-too-long': longer than 15 bytes",
        ),
        (
            "KubeSpanPyConfig.discoveryEndpoint",
            "cluster discovery service registry endpoint is invalid: 'ftp://x/' "
            "(expected http://, https:// or grpc://host[:port])",
        ),
    ]


def test_structure_errors() -> None:
    assert problems("version: v1alpha1\nmachine: [1]\ncluster: 3\n") == [
        ("machine", "expected a mapping, got list"),
        ("cluster", "expected a mapping, got integer"),
    ]
    assert problems("- 1\n") == [("<document 1>", "expected a mapping, got list")]
    got = problems("version: v1alpha1\nmachine: {network: {kubespan: {enabled: [}}}\n")
    assert got[0][0] == "<yaml>" and got[0][1].startswith("not valid YAML")
    assert problems(base() + "---\n" + base()) == [("<document 2>", "duplicate v1alpha1 document")]
    assert problems(base() + "---\napiVersion: v2\nkind: KubeSpanPyConfig\n") == [
        ("KubeSpanPyConfig.apiVersion", "unsupported apiVersion 'v2' (expected v1alpha1)")
    ]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    got = problems(str(tmp_path / "absent.yaml"))
    assert got[0][0] == str(tmp_path / "absent.yaml") and got[0][1].startswith(
        "cannot read config file"
    )


def test_config_error_lists_every_problem_in_its_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(base("enabled: true\nmtu: 100\nbad: 1"))
    text = str(info.value)
    assert "machine.network.kubespan.mtu: kubespan link MTU must be at least 1280" in text
    assert "machine.network.kubespan.bad: unknown key" in text
    assert SECRET not in text


def test_kubespan_disabled_without_discovery_is_valid() -> None:
    cfg = load_config("version: v1alpha1\nmachine: {}\ncluster: {}\n")
    assert cfg == MachineConfig()


# --- arbitrary input never escapes as anything but ConfigError --------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.sampled_from(["10.0.0.0/8", "!1.2.3.4", "[::1]:80", "1.2.3.4:5", "abc"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "enabled",
                    "mtu",
                    "filters",
                    "endpoints",
                    "excludeAdvertisedNetworks",
                    "service",
                    "kubernetes",
                    "registries",
                    "disabled",
                    "endpoint",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(kubespan=_values, discovery=_values, ours=_values, secret=_scalars)
def test_fuzzed_configs_raise_only_config_error(kubespan, discovery, ours, secret) -> None:
    docs = [
        {
            "version": "v1alpha1",
            "machine": {"network": {"kubespan": kubespan}},
            "cluster": {"id": "x", "secret": secret, "discovery": discovery},
        },
        {
            "apiVersion": "v1alpha1",
            "kind": "KubeSpanPyConfig",
            "podCIDRs": ours,
            "listenPort": ours,
        },
        {
            "apiVersion": "v1alpha1",
            "kind": "KubeSpanEndpointsConfig",
            "extraAnnouncedEndpoints": ours,
        },
        {
            "apiVersion": "v1alpha1",
            "kind": "DiscoveryServiceConfig",
            "name": ours,
            "endpoint": secret,
        },
        {"apiVersion": "v1alpha1", "kind": "DiscoveryIdentityConfig", "clusterSecret": secret},
        {"apiVersion": "v1alpha1", "kind": "KubeNetworkConfig", "podSubnets": discovery},
        {"apiVersion": "v1alpha1", "kind": "KubeAPIServerConfig", "apiPort": secret},
    ]
    docs[0]["machine"].update(type=secret, features=kubespan, kubelet=ours)
    docs[0]["cluster"].update(network=discovery, controlPlane=ours)
    try:
        load_config(yaml.safe_dump_all(docs))
    except ConfigError as exc:
        assert exc.problems and all(
            isinstance(p, str) and isinstance(m, str) for p, m in exc.problems
        )


def test_relay_settings() -> None:
    cfg = load_config(
        base()
        + doc(
            "KubeSpanPyConfig",
            relays=["203.0.113.10:51821", "[2001:db8::1]:4000"],
            runRelay=True,
            relayPort=3478,
        )
    )
    assert cfg.local.relays == (("203.0.113.10", 51821), ("2001:db8::1", 4000))
    assert cfg.local.run_relay and cfg.local.relay_port == 3478
    default = load_config(base()).local
    assert (default.relays, default.run_relay, default.relay_port) == ((), False, 51821)


def test_relay_settings_errors() -> None:
    bad = doc(
        "KubeSpanPyConfig",
        relays=["relay.example.com:51821", "203.0.113.10", "1.2.3.4:5", "1.2.3.4:5"],
        runRelay="yes",
        relayPort=51820,
    )
    assert problems(base() + bad) == [
        (
            "KubeSpanPyConfig.relays[0]",
            "relay address (ip:port) is not valid: 'relay.example.com:51821' "
            "('relay.example.com' is not an IP address)",
        ),
        (
            "KubeSpanPyConfig.relays[1]",
            "relay address (ip:port) is not valid: '203.0.113.10' "
            "(expected ip:port (IPv6 as [ip]:port))",
        ),
        ("KubeSpanPyConfig.relays", "a relay is listed twice"),
        ("KubeSpanPyConfig.runRelay", "expected a boolean, got string"),
        ("KubeSpanPyConfig.relayPort", "relay port 51820 is WireGuard's listen port"),
    ]
    clash = doc("KubeSpanPyConfig", listenPort=51821, runRelay=True)
    assert problems(base() + clash) == [
        ("KubeSpanPyConfig.relayPort", "the default relay port 51821 is WireGuard's listen port")
    ]
    assert problems(base() + doc("KubeSpanPyConfig", relayPort=0)) == [
        ("KubeSpanPyConfig.relayPort", "relay port must be in 1-65535, got 0")
    ]
