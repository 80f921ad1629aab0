"""Plaintext padding (wireguard-go calculatePaddingSize) and IP length parsing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan_dp.padding import ip_packet_length, pad_plaintext, padding_size


@pytest.mark.parametrize(
    ("size", "mtu", "padded"),
    [
        (0, 1420, 0),  # keepalive stays empty
        (1, 1420, 16),
        (15, 1420, 16),
        (16, 1420, 16),
        (17, 1420, 32),
        (1408, 1420, 1408),
        (1409, 1420, 1420),  # next multiple (1424) is beyond the MTU: cap
        (1419, 1420, 1420),
        (1420, 1420, 1420),  # exactly the MTU: nothing added
        (1280, 1280, 1280),
        (21, 0, 32),  # mtu 0: no cap
        (0, 0, 0),
    ],
)
def test_padded_length(size: int, mtu: int, padded: int) -> None:
    out = pad_plaintext(b"\x45" * size, mtu)
    assert len(out) == padded
    assert out[:size] == b"\x45" * size
    assert out[size:] == bytes(padded - size)


def test_oversized_packet_padded_by_its_last_piece() -> None:
    # 1500 bytes over an MTU of 1420: last piece is 80 bytes, already aligned.
    assert padding_size(1500, 1420) == 0
    # 1430 -> last piece 10 -> padded to 16.
    assert padding_size(1430, 1420) == 6


@given(st.integers(0, 3000), st.integers(1, 9000))
def test_padding_invariants(size: int, mtu: int) -> None:
    pad = padding_size(size, mtu)
    assert 0 <= pad < 16
    if size <= mtu:
        total = size + pad
        assert total <= mtu
        assert total % 16 == 0 or total == mtu


def _v4(total: int, buffer: int | None = None) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, bytes(4), bytes(4))
    size = total if buffer is None else buffer
    return (header + bytes(max(0, size - 20)))[:size]


def _v6(payload: int, buffer: int | None = None) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, payload, 17, 64, bytes(16), bytes(16))
    size = 40 + payload if buffer is None else buffer
    return (header + bytes(max(0, size - 40)))[:size]


def test_ipv4_length() -> None:
    assert ip_packet_length(_v4(28)) == 28
    assert ip_packet_length(_v4(28, buffer=32)) == 28  # padding after the packet
    assert ip_packet_length(_v4(20)) == 20
    assert ip_packet_length(_v4(29, buffer=28)) is None  # truncated
    assert ip_packet_length(_v4(19, buffer=32)) is None  # below the fixed header
    assert ip_packet_length(_v4(28)[:19]) is None  # too short for a header


def test_ipv6_length() -> None:
    assert ip_packet_length(_v6(8)) == 48
    assert ip_packet_length(_v6(8, buffer=64)) == 48
    assert ip_packet_length(_v6(0)) == 40
    assert ip_packet_length(_v6(9, buffer=48)) is None
    assert ip_packet_length(_v6(0)[:39]) is None


def test_other_versions_and_empty() -> None:
    assert ip_packet_length(b"") is None
    assert ip_packet_length(b"\x55" + bytes(40)) is None
    assert ip_packet_length(bytes(60)) is None


@given(st.integers(20, 1280), st.sampled_from([0, 1280, 1420]))
def test_pad_then_strip_roundtrip(total: int, mtu: int) -> None:
    packet = _v4(total)
    padded = pad_plaintext(packet, mtu)
    assert padded[: ip_packet_length(padded)] == packet
