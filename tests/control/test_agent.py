"""The agent's decisions that need no network: which services it talks to, what a
reloaded config changes in place, and `mtu: 0`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control.agent import left_cluster, needs_rebuild, service_targets
from control.config import KUBESPAN_LINK_MTU, ConfigError, load_config
from control.discovery.pool import ServiceTarget
from tests.control.test_config import base

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
    cfg = load_config(
        base(discovery="enabled: true\nregistries:\n  service:\n    endpoint: http://10.0.0.1:3000")
    )
    assert service_targets(cfg) == [ServiceTarget("default", "10.0.0.1:3000", insecure=True)]
    tls = load_config(base())
    assert service_targets(tls) == [ServiceTarget("default", "discovery.talos.dev:443", False)]
    off = load_config(base("enabled: false", discovery="enabled: false"))
    assert service_targets(off) == []


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
