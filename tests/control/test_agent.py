"""The agent's decisions that need no network: which services it talks to, what a
reloaded config changes in place, and `mtu: 0`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control.agent import left_cluster, needs_rebuild, service_targets
from control.config import KUBESPAN_LINK_MTU, ConfigError, load_config
from tests.control.test_config import SECRET, base

KUBESPAN_DOC = "apiVersion: v1alpha1\nkind: KubeSpanConfig\nenabled: true\nmtu: 0\n"


def test_mtu_zero_in_v1alpha1_means_the_default_as_in_talos() -> None:
    assert load_config(base("enabled: true\nmtu: 0")).kubespan.mtu == KUBESPAN_LINK_MTU
    assert load_config(base("enabled: true\nmtu: 1380")).kubespan.mtu == 1380


def test_mtu_zero_in_the_kubespan_document_is_refused_as_in_talos() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(base("enabled: false") + "---\n" + KUBESPAN_DOC)
    paths = [p for p, _ in info.value.problems]
    assert "KubeSpanConfig.mtu" in paths


def test_service_targets_from_the_config() -> None:
    def targets(text: str) -> list[tuple[str, bool]]:
        return [(t.endpoint, t.insecure) for t in service_targets(load_config(text))]

    endpoint = "registries:\n  service:\n    endpoint: http://10.0.0.1:3000"
    assert targets(base(discovery=f"enabled: true\n{endpoint}")) == [("10.0.0.1:3000", True)]
    assert targets(base()) == [("discovery.talos.dev:443", False)]
    assert targets(base("enabled: false", discovery="enabled: false")) == []
    # Talos 1.14 style: no .cluster.discovery, one DiscoveryServiceConfig per service.
    v1alpha1 = "version: v1alpha1\nmachine: {network: {kubespan: {enabled: true}}}\n"
    v1alpha1 += f"cluster: {{id: {'c' * 43}=, secret: {SECRET}}}\n"
    two = "".join(
        f"---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: {name}\nendpoint: {url}\n"
        for name, url in (("one", "http://192.0.2.250:3000"), ("two", "https://d.example/"))
    )
    documents = service_targets(load_config(v1alpha1 + two))
    assert [(t.name, t.endpoint, t.insecure) for t in documents] == [
        ("one", "192.0.2.250:3000", True),
        ("two", "d.example:443", False),
    ]


def test_what_a_reload_rebuilds_and_what_it_changes_in_place() -> None:
    old = load_config(base())
    ks, local = old.kubespan, old.local
    in_place = [
        replace(old, kubespan=replace(ks, mtu=1380)),
        replace(old, kubespan=replace(ks, endpoint_filters=("0.0.0.0/0",))),
        replace(old, kubespan=replace(ks, allow_down_peer_bypass=True)),
        replace(old, local=replace(local, listen_port=51821)),
        replace(old, local=replace(local, discovery_endpoint="http://10.0.0.2:3000")),
    ]
    for new in in_place:
        assert not needs_rebuild(old, new), new
    rebuilt = [
        replace(old, cluster_secret="x"),
        replace(old, local=replace(local, link_name="ks1")),
        replace(old, local=replace(local, wireguard_mode="kernel")),
    ]
    for new in rebuilt:
        assert needs_rebuild(old, new) and not left_cluster(old, new), new
    for new in (
        replace(old, cluster_id="other"),
        replace(old, local=replace(local, state_dir="/tmp/x")),
    ):
        assert needs_rebuild(old, new) and left_cluster(old, new), new
