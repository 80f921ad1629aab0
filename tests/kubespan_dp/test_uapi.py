"""The UAPI protocol parser and serializer, without a daemon."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan_dp import uapi
from kubespan_dp.uapi import UNSET, UapiError, parse_set

K1 = "11" * 32
K2 = "22" * 32


def test_full_request() -> None:
    req = parse_set(
        [
            f"private_key={K1}",
            "listen_port=51820",
            "fwmark=32",
            "replace_peers=true",
            f"public_key={K2}",
            f"preshared_key={K1}",
            "endpoint=[fd00::1]:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.1/32",
            "allowed_ip=fd00::/64",
            "protocol_version=1",
            f"public_key={K1}",
            "remove=true",
            f"public_key={K1}",
            "update_only=true",
            "endpoint=1.2.3.4:5",
        ]
    )
    assert req.private_key == bytes.fromhex(K1)
    assert (req.listen_port, req.fwmark, req.replace_peers) == (51820, 32, True)
    p, r, u = req.peers
    assert p.public_key == bytes.fromhex(K2) and p.preshared_key == bytes.fromhex(K1)
    assert p.endpoint == ("fd00::1", 51820) and p.persistent_keepalive == 25
    assert p.replace_allowed_ips
    assert p.allowed_ips == [ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("fd00::/64")]
    assert r.remove and not r.update_only
    assert u.update_only and u.endpoint == ("1.2.3.4", 5)


def test_zero_keys_mean_none_and_late_replace_discards_earlier_ips() -> None:
    req = parse_set(
        [
            f"private_key={'0' * 64}",
            f"public_key={K2}",
            f"preshared_key={'0' * 64}",
            "allowed_ip=10.0.0.0/8",
            "replace_allowed_ips=true",
            "allowed_ip=10.1.0.0/16",
        ]
    )
    assert req.private_key is None
    assert req.peers[0].preshared_key is None
    assert req.peers[0].allowed_ips == [ipaddress.ip_network("10.1.0.0/16")]


def test_host_bits_are_masked() -> None:
    req = parse_set([f"public_key={K2}", "allowed_ip=10.1.2.3/16"])
    assert req.peers[0].allowed_ips == [ipaddress.ip_network("10.1.0.0/16")]


def test_unset_fields_stay_unset() -> None:
    req = parse_set([f"public_key={K2}"])
    assert req.private_key is UNSET and req.listen_port is UNSET and req.fwmark is UNSET
    assert req.peers[0].endpoint is UNSET and req.peers[0].preshared_key is UNSET


BAD = [
    (["listen_port=65536"], -22),
    (["listen_port=-1"], -22),
    (["listen_port= 1"], -22),
    (["listen_port=+1"], -22),
    (["listen_port=1_0"], -22),
    (["fwmark=4294967296"], -22),
    (["fwmark=0x20"], -22),
    (["private_key=abc"], -22),
    ([f"private_key={'g' * 64}"], -22),
    (["replace_peers=false"], -22),
    (["bogus=1"], -22),
    (["no equals sign"], -71),
    ([f"public_key={K2}", "listen_port=1"], -22),  # device key inside a peer section
    ([f"public_key={K2}", "endpoint=1.2.3.4"], -22),
    ([f"public_key={K2}", "endpoint=host:1"], -22),
    ([f"public_key={K2}", "endpoint=[::1]"], -22),
    ([f"public_key={K2}", "endpoint=::1:5"], -22),
    ([f"public_key={K2}", "endpoint=1.2.3.4:99999"], -22),
    ([f"public_key={K2}", "endpoint=1.2.3.4:0"], -22),
    ([f"public_key={K2}", "allowed_ip=10.0.0.0/33"], -22),
    ([f"public_key={K2}", "allowed_ip=10.0.0.0"], -22),
    ([f"public_key={K2}", "allowed_ip=fe80::%eth0/64"], -22),
    ([f"public_key={K2}", "persistent_keepalive_interval=65536"], -22),
    ([f"public_key={K2}", "protocol_version=2"], -22),
    ([f"public_key={K2}", "remove=1"], -22),
    ([f"public_key={K2}", "update_only=yes"], -22),
    ([f"public_key={K2}", "replace_allowed_ips=x"], -22),
    ([f"public_key={K2[:-1]}"], -22),
]


@pytest.mark.parametrize("lines,code", BAD)
def test_bad_requests(lines: list[str], code: int) -> None:
    with pytest.raises(UapiError) as err:
        parse_set(lines)
    assert err.value.errno == code


@given(st.lists(st.text(max_size=80), max_size=8))
def test_arbitrary_lines_parse_or_raise_uapi_error(lines: list[str]) -> None:
    try:
        parse_set(lines)
    except UapiError as e:
        assert e.errno in (-22, -71)


def test_format_get() -> None:
    dev = uapi.DeviceInfo(
        bytes.fromhex(K1),
        51820,
        0,
        [
            uapi.PeerInfo(
                bytes.fromhex(K2),
                None,
                ("fd00::1", 7),
                1_700_000_000_123_456_789,
                10,
                20,
                25,
                [ipaddress.ip_network("10.0.0.0/8")],
            )
        ],
    )
    assert uapi.format_get(dev).splitlines() == [
        f"private_key={K1}",
        "listen_port=51820",
        f"public_key={K2}",
        f"preshared_key={'0' * 64}",
        "protocol_version=1",
        "endpoint=[fd00::1]:7",
        "last_handshake_time_sec=1700000000",
        "last_handshake_time_nsec=123456789",
        "tx_bytes=10",
        "rx_bytes=20",
        "persistent_keepalive_interval=25",
        "allowed_ip=10.0.0.0/8",
    ]
