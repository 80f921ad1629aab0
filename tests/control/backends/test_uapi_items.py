"""UAPI text building/parsing and the peer diff (pure)."""

from __future__ import annotations

from ipaddress import ip_network as N

import pytest

from control.backends.base import PeerConfig, validate_peers
from control.backends.uapi_client import peer_items
from control.backends.userspace import diff_items
from kubespan_dp.netutil import EndpointError, format_endpoint, parse_endpoint

K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))
PSK = bytes(range(32))


def test_endpoints_round_trip() -> None:
    assert format_endpoint(("192.0.2.1", 51820)) == "192.0.2.1:51820"
    assert format_endpoint(("2001:db8::1", 51820)) == "[2001:db8::1]:51820"
    assert parse_endpoint("[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    assert parse_endpoint("192.0.2.1:1") == ("192.0.2.1", 1)
    for bad, why in (
        (("192.0.2.1", 0), "port 0 is not in 1-65535"),
        (("192.0.2.1", 65536), "port 65536 is not in 1-65535"),
        (("host.example", 1), "'host.example' is not an IP address"),
    ):
        with pytest.raises(EndpointError, match=why):
            peer_items(K1, endpoint=bad)  # endpoints are checked before they are written


def test_peer_items() -> None:
    assert peer_items(K1, remove=True) == [("public_key", K1.hex()), ("remove", "true")]
    items = peer_items(K1, update_only=True, preshared_key=None, allowed_ips=[N("10.0.0.0/8")])
    assert items == [
        ("public_key", K1.hex()),
        ("update_only", "true"),
        ("preshared_key", "0" * 64),
        ("replace_allowed_ips", "true"),
        ("allowed_ip", "10.0.0.0/8"),
    ]
    with pytest.raises(ValueError):
        peer_items(b"\1" * 31)


def cfg(key, ep=("192.0.2.1", 51820), ka=25, ips=None, psk=PSK) -> PeerConfig:
    ips = ips or (f"10.0.0.{key[0]}/32",)  # one per peer: a prefix belongs to one peer only
    return PeerConfig(key, psk, ep, ka, tuple(N(i) for i in ips))


def test_diff_only_touches_changed_peers() -> None:
    old = validate_peers([cfg(K1), cfg(K2)])
    new = validate_peers([cfg(K1), cfg(K2, ips=("10.0.0.2/32", "10.1.0.0/16")), cfg(K3, ep=None)])
    items = diff_items(old, new)
    assert ("public_key", K1.hex()) not in items  # unchanged: not mentioned at all
    i2 = items.index(("public_key", K2.hex()))
    assert items[i2 + 1] == ("update_only", "true")
    assert ("replace_allowed_ips", "true") in items[i2:]
    assert ("endpoint", "192.0.2.1:51820") not in items[i2 : items.index(("public_key", K3.hex()))]
    i3 = items.index(("public_key", K3.hex()))
    assert ("update_only", "true") not in items[i3:]  # a new peer is created
    assert not any(k == "endpoint" for k, _ in items[i3:])
    # removal, endpoint None = keep, endpoint change, psk cleared
    assert diff_items(old, validate_peers([cfg(K1)])) == [
        ("public_key", K2.hex()),
        ("remove", "true"),
    ]
    assert diff_items(old, validate_peers([cfg(K1, ep=None), cfg(K2)])) == []
    moved = diff_items(old, validate_peers([cfg(K1, ep=("2001:db8::1", 1)), cfg(K2, psk=None)]))
    assert moved == [
        ("public_key", K1.hex()),
        ("update_only", "true"),
        ("endpoint", "[2001:db8::1]:1"),
        ("public_key", K2.hex()),
        ("update_only", "true"),
        ("preshared_key", "0" * 64),
    ]
    # the order of allowed IPs is not a change
    assert (
        diff_items(
            validate_peers([cfg(K1, ips=("10.0.0.1/32", "10.9.0.0/16"))]),
            validate_peers([cfg(K1, ips=("10.9.0.0/16", "10.0.0.1/32"))]),
        )
        == []
    )
