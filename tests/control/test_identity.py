"""Node identity: Talos's address vectors, persistence, 0600, no clobbering, corrupt files."""

from __future__ import annotations

import multiprocessing
import os
import stat
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest
import yaml

from control import base62, keys
from control.identity import (
    KUBESPAN_IDENTITY_FILE,
    NODE_IDENTITY_FILE,
    IdentityError,
    create_exclusive,
    eui64_address,
    first_physical_mac,
    load_or_create_kubespan_identity,
    load_or_create_node_id,
)
from control.ula import ula_prefix

# Talos: pkg/machinery/resources/network/ula_test.go and the local affiliate test.
CLUSTER_ID = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SUBNET = IPv6Network("fd7f:175a:b97c:5602::/64")
MAC = "ea:71:1b:b2:cc:ee"
ADDRESS = IPv6Address("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee")


def test_ula_subnet_vector() -> None:
    assert ula_prefix(CLUSTER_ID) == SUBNET


def test_eui64_vector() -> None:
    assert eui64_address(SUBNET, MAC) == ADDRESS
    assert eui64_address(SUBNET, bytes.fromhex("ea711bb2ccee")) == ADDRESS


def test_bad_mac_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a 48-bit MAC"):
        load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, "ea:71:1b")
    assert list(tmp_path.iterdir()) == []


def test_identity_created_once_0600_and_survives_restart(tmp_path: Path) -> None:
    first = load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC)
    path = tmp_path / KUBESPAN_IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"address", "subnet", "privateKey", "publicKey"}
    assert data["address"] == f"{ADDRESS}/128" and data["subnet"] == str(SUBNET)
    assert keys.public_key(keys.decode_key(data["privateKey"])) == keys.decode_key(
        data["publicKey"]
    )
    assert first.address.ip == ADDRESS and first.subnet == SUBNET
    assert str(first.link_address) == f"{ADDRESS}/64"
    before = path.read_bytes()
    again = load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC)
    assert again == first and path.read_bytes() == before
    assert first.private_key_b64 not in repr(first)


def test_address_recomputed_at_load_keys_kept(tmp_path: Path) -> None:
    first = load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC)
    moved = load_or_create_kubespan_identity(tmp_path, "another-cluster", "02:00:00:00:00:01")
    assert moved.public_key == first.public_key and moved.private_key == first.private_key
    assert moved.subnet == ula_prefix("another-cluster")
    assert moved.address.ip == eui64_address(moved.subnet, "02:00:00:00:00:01")


def _race_worker(state_dir: str, barrier, queue) -> None:
    barrier.wait()
    identity = load_or_create_kubespan_identity(state_dir, CLUSTER_ID, MAC)
    node_id = load_or_create_node_id(state_dir)
    queue.put((identity.public_key, node_id))


def test_racing_processes_agree_and_never_clobber(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, queue)) for _ in range(n)
    ]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert len(set(results)) == 1
    key, node_id = results[0]
    assert load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC).public_key == key
    assert load_or_create_node_id(tmp_path) == node_id
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [KUBESPAN_IDENTITY_FILE, NODE_IDENTITY_FILE]
    )


def test_second_process_cannot_clobber_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    assert create_exclusive(path, b"first\n")
    assert not create_exclusive(path, b"second\n")
    assert path.read_bytes() == b"first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.yaml"]  # no temporary files left


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\xff garbage [", "identity file"),
        (b"- a list\n", "not a YAML mapping"),
        (b"privateKey: abc\npublicKey: def\n", "privateKey/publicKey"),
        (
            b"privateKey: "
            + keys.encode_key(bytes(32)).encode()
            + b"\npublicKey: "
            + keys.encode_key(b"\x01" * 32).encode()
            + b"\n",
            "publicKey does not match privateKey",
        ),
    ],
)
def test_corrupt_identity_is_an_error_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / KUBESPAN_IDENTITY_FILE
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=message) as info:
        load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never replaced


def test_unreadable_identity_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / KUBESPAN_IDENTITY_FILE
    path.mkdir()  # exists, can't be read as a file (we are root, so modes don't stop us)
    with pytest.raises(IdentityError, match="cannot read identity file") as info:
        load_or_create_kubespan_identity(tmp_path, CLUSTER_ID, MAC)
    assert str(path) in str(info.value)


def test_node_id_persisted_and_base62(tmp_path: Path) -> None:
    node_id = load_or_create_node_id(tmp_path)
    assert set(node_id) <= set(base62.ALPHABET)
    assert len(base62.decode(node_id)) == 32
    assert load_or_create_node_id(tmp_path) == node_id
    path = tmp_path / NODE_IDENTITY_FILE
    assert yaml.safe_load(path.read_text()) == {"nodeId": node_id}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_node_id(tmp_path: Path) -> None:
    path = tmp_path / NODE_IDENTITY_FILE
    path.write_text("nodeId: 'not base62!'\n")
    with pytest.raises(IdentityError, match="nodeId is not base62") as info:
        load_or_create_node_id(tmp_path)
    assert str(path) in str(info.value)


def test_base62_round_trip_edges() -> None:
    for size in range(0, 70):
        for data in (bytes(size), b"\xff" * size, os.urandom(size)):
            assert base62.decode(base62.encode(data)) == data
    # low group 0b111111 is compact (bits 1-4 set): emits 31 ("f") consuming 5 bits, then 1 ("B")
    assert base62.encode(b"\x3f") == "fB"
    assert base62.encode(b"\x00") == "AA"


def _fake_link(root: Path, name: str, mac: str, kind: str = "1", physical: bool = False) -> None:
    link = root / name
    link.mkdir()
    (link / "address").write_text(mac + "\n")
    (link / "type").write_text(kind + "\n")
    if physical:
        (link / "device").mkdir()


def test_first_physical_mac_layout(tmp_path: Path) -> None:
    _fake_link(tmp_path, "lo", "00:00:00:00:00:00", "772")
    _fake_link(tmp_path, "veth0", "02:00:00:00:00:aa")
    _fake_link(tmp_path, "kubespan", "02:00:00:00:00:bb", physical=True)
    _fake_link(tmp_path, "eth1", "EA:71:1B:B2:CC:EF", physical=True)
    _fake_link(tmp_path, "eth0", "ea:71:1b:b2:cc:ee", physical=True)
    assert first_physical_mac(tmp_path) == MAC
    for name in ("eth0", "eth1"):
        (tmp_path / name / "device").rmdir()
    assert first_physical_mac(tmp_path) is None
    assert first_physical_mac(tmp_path, allow_virtual=True) == "ea:71:1b:b2:cc:ee"
    assert first_physical_mac(tmp_path / "missing") is None


def test_first_physical_mac_on_this_host() -> None:
    mac = first_physical_mac(allow_virtual=True)
    assert mac is None or eui64_address(SUBNET, mac) in SUBNET
