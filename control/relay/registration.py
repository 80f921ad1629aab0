"""The relay registration message: "this WireGuard public key is at the address I came from".

A node sends it from its WireGuard listen port (control.wgport), so the relay learns the
NAT mapping that WireGuard's own packets to the relay use. Layout (60 bytes):

    type    4  b"KSR\\x01": as a little-endian u32 an unknown WireGuard message type,
               so WireGuard drops it if it ever reaches one
    key    32  the node's WireGuard public key
    time    8  Unix time in nanoseconds, big endian (replay protection)
    mac    16  keyed BLAKE2s over the above, key derived from the cluster secret

Only cluster members (who hold the secret) can register; the relay accepts a key's
timestamps only strictly increasing and close to its own clock, so a captured
registration cannot be replayed from another address.
"""

from __future__ import annotations

import struct

from kubespan_dp import crypto

TYPE = b"KSR\x01"
SIZE = 60
_BODY = struct.Struct("!4s32sQ")  # type, key, time; the MAC follows
KEY_LABEL = b"kubespan relay registration v1"


def registration_key(cluster_id: str, cluster_secret: bytes) -> bytes:
    """A key used for nothing else than registrations, bound to the cluster."""
    return crypto.hmac_(cluster_secret, KEY_LABEL, cluster_id.encode())


def encode(key: bytes, public_key: bytes, now_ns: int) -> bytes:
    if len(public_key) != 32:
        raise ValueError("a WireGuard public key is 32 bytes")
    body = _BODY.pack(TYPE, public_key, now_ns)
    return body + crypto.mac(key, body)


def decode(key: bytes, data: bytes) -> tuple[bytes, int] | None:
    """(public key, time in ns) of a genuine registration; None for anything else."""
    if len(data) != SIZE or not data.startswith(TYPE):
        return None
    body, tag = data[: _BODY.size], data[_BODY.size :]
    if not crypto.constant_time_equal(crypto.mac(key, body), tag):
        return None
    _, public_key, now_ns = _BODY.unpack(body)
    return public_key, now_ns


def register(
    listen_port: int, relays: list[tuple[str, int]], key: bytes, public_key: bytes, now_ns: int
) -> dict[tuple[str, int], Exception]:
    """Send one registration to each relay from WireGuard's port; the errors by relay."""
    from control import wgport  # raw sockets: only senders need them

    return wgport.send_to_each(listen_port, relays, encode(key, public_key, now_ns))
