"""Plaintext padding before encryption, and finding the real length after it.

WireGuard pads each IP packet with zeros up to a multiple of 16 bytes so that
ciphertext lengths leak less, but never past the tunnel MTU (an MTU-sized packet
must still fit). A keepalive is the empty plaintext and stays empty. The
receiver strips the padding again by reading the length the IP header states.
"""

from __future__ import annotations

from .constants import PADDING_MULTIPLE as PADDING_MULTIPLE  # one source with the C fast path

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40


def padding_size(packet_size: int, mtu: int) -> int:
    """How many zero bytes to append to a plaintext of ``packet_size`` bytes.

    ``mtu`` 0 means no cap. A packet longer than the MTU (offloaded segments)
    is padded as if it were its last MTU-sized piece, as wireguard-go does.
    """
    last_unit = packet_size
    if mtu == 0:
        return -last_unit % PADDING_MULTIPLE
    if last_unit > mtu:
        last_unit %= mtu
    padded = min((last_unit + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1), mtu)
    return padded - last_unit


def pad_plaintext(packet: bytes, mtu: int) -> bytes:
    """``packet`` followed by its zero padding; the empty keepalive stays empty."""
    n = padding_size(len(packet), mtu)
    return packet + bytes(n) if n else packet


def ip_packet_length(packet: bytes) -> int | None:
    """Total length the IPv4/IPv6 header claims, or None if it cannot be trusted.

    None for an empty packet, an unknown IP version, a buffer shorter than the
    fixed header, or a stated length longer than the buffer (truncated) or, for
    IPv4, shorter than the fixed header.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_HEADER_LEN:
            return None
        length = int.from_bytes(packet[2:4], "big")
        if length < IPV4_HEADER_LEN or length > len(packet):
            return None
        return length
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            return None
        length = IPV6_HEADER_LEN + int.from_bytes(packet[4:6], "big")
        if length > len(packet):
            return None
        return length
    return None
