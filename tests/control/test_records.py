"""Records: talosctl columns, versions, YAML/JSON, and private keys kept out."""

from __future__ import annotations

import json
from ipaddress import IPv6Address, ip_network
from pathlib import Path

import pytest
import yaml

from control.identity import load_or_create_kubespan_identity
from control.peerspec import PeerSpec
from control.records import (
    ENDPOINT,
    IDENTITY,
    PEER_SPEC,
    PEER_STATUS,
    RecordStore,
    endpoint_record,
    identity_record,
    kind_by_name,
    peer_spec_record,
    peer_status_record,
    render,
)
from tests.talosctl import COMMON_COLUMNS, PEER_STATUS_HEADER

KEY = "mB6WlFOR66Jx5rtPMIpxJ3s4XHyer9NCzqWPP7idGRo="
SPEC = PeerSpec(
    KEY,
    IPv6Address("fd00::1"),
    (ip_network("10.244.4.0/24"), ip_network("fd00::1/128")),
    (("192.168.3.6", 51820), ("2001:db8::6", 51820)),
    "worker-2",
)


def test_peer_spec_table_has_talosctl_columns() -> None:
    out = render([peer_spec_record(SPEC)], PEER_SPEC, node="172.20.0.2")
    header, row = out.splitlines()
    assert header.split() == [*COMMON_COLUMNS, "LABEL", "ENDPOINTS"]
    assert row.split() == [
        "172.20.0.2",
        "kubespan",
        "KubeSpanPeerSpec",
        KEY,
        "1",
        "worker-2",
        '["192.168.3.6:51820","[2001:db8::6]:51820"]',
    ]
    # columns line up: each header starts where its values start, 3 spaces of padding minimum
    assert header.index("ID") == row.index(KEY)
    assert header.index("LABEL") == row.index("worker-2")
    assert row.index("worker-2") - (row.index(KEY) + len(KEY)) >= 3 + len("VERSION")


def test_status_identity_endpoint_columns(tmp_path: Path) -> None:
    status = peer_status_record(
        KEY,
        label="worker-2",
        state="up",
        endpoint=("192.168.3.6", 51820),
        rx_bytes=1234,
        tx_bytes=5678,
        last_handshake=0.0,
    )
    header, row = render([status], PEER_STATUS).splitlines()
    assert header.split() == PEER_STATUS_HEADER
    assert row.split()[-6:] == ["worker-2", "192.168.3.6:51820", "up", "1234", "5678", "direct"]
    assert status.spec["lastHandshakeTime"] == "1970-01-01T00:00:00Z"
    assert status.spec["lastEndpointChange"] == "0001-01-01T00:00:00Z"

    identity = load_or_create_kubespan_identity(tmp_path, "cid", "02:00:00:00:00:01")
    header, row = render([identity_record(identity)], IDENTITY).splitlines()
    assert header.split() == [*COMMON_COLUMNS, "ADDRESS", "PUBLICKEY"]
    assert row.split()[-2:] == [str(identity.address), identity.public_key_b64]

    header, row = render(
        [endpoint_record(KEY, "node-a", ("2001:db8::6", 51820))], ENDPOINT
    ).splitlines()
    assert header.split() == [*COMMON_COLUMNS, "ENDPOINT", "AFFILIATE", "ID"]  # AFFILIATE ID
    assert row.split()[-2:] == ["[2001:db8::6]:51820", "node-a"]


def test_identity_private_key_redacted_unless_asked(tmp_path: Path) -> None:
    identity = load_or_create_kubespan_identity(tmp_path, "cid", "02:00:00:00:00:01")
    for output in ("table", "yaml", "json"):
        assert identity.private_key_b64 not in render([identity_record(identity)], IDENTITY, output)
    assert (
        identity_record(identity, reveal_private_key=True).spec["privateKey"]
        == identity.private_key_b64
    )


def test_yaml_and_json_documents() -> None:
    record = peer_spec_record(SPEC)
    doc = yaml.safe_load(render([record], PEER_SPEC, "yaml", node="n1"))
    assert doc["metadata"] == {
        "namespace": "kubespan",
        "type": "KubeSpanPeerSpecs.kubespan.talos.dev",
        "id": KEY,
        "version": 1,
        "phase": "running",
    }
    assert doc["spec"] == {
        "address": "fd00::1",
        "allowedIPs": ["10.244.4.0/24", "fd00::1/128"],
        "endpoints": ["192.168.3.6:51820", "[2001:db8::6]:51820"],
        "label": "worker-2",
    }
    assert doc["node"] == "n1"
    two = render([record, record], PEER_SPEC, "yaml")
    assert len(list(yaml.safe_load_all(two))) == 2
    assert json.loads(render([record], PEER_SPEC, "json"))["spec"] == doc["spec"]
    with pytest.raises(ValueError):
        render([record], PEER_SPEC, "xml")


def test_store_versions_and_replacement() -> None:
    store = RecordStore()
    store.put(peer_spec_record(SPEC))
    assert store.put(peer_spec_record(SPEC)).version == 1  # unchanged spec, same version
    changed = PeerSpec(KEY, SPEC.address, SPEC.allowed_ips, SPEC.endpoints, "renamed")
    assert store.put(peer_spec_record(changed)).version == 2
    store.replace_kind(PEER_SPEC, [])
    assert store.list(PEER_SPEC) == [] and store.get(PEER_SPEC, KEY) is None


def test_kind_names_and_bad_state() -> None:
    assert kind_by_name("kubespanpeerspecs") is PEER_SPEC
    assert kind_by_name("KubeSpanPeerStatus") is PEER_STATUS
    with pytest.raises(KeyError):
        kind_by_name("pods")
    with pytest.raises(ValueError):
        peer_status_record(KEY, label="x", state="sideways", endpoint=None)
