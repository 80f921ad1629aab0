"""The contract between the KubeSpan agent and a WireGuard implementation.

Both backends (kernel module over netlink, our userspace daemon over UAPI) expose the
same synchronous interface; the agent never needs to know which one runs underneath.
Keys are raw 32-byte values here; hex and base64 appear only at the edges.

What both backends accept, and how they decide which peers to write, lives here too:
`validate_device` and `validate_peers` check (and normalise) every argument before a
backend changes anything, raising `BackendConfigError`; `diff_peers` says which peers
to remove, create or update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol, runtime_checkable

from control.keys import KEY_SIZE
from kubespan_dp.netutil import (
    Address,
    EndpointError,
    InterfaceNameError,
    IPNetwork,
    check_endpoint,
    check_ifname,
)

ZERO_KEY = bytes(KEY_SIZE)  # "no preshared key", to netlink and UAPI alike
MIN_MTU = 1280  # the IPv6 minimum: the link carries IPv6
MAX_MTU = 65535


class BackendError(RuntimeError):
    """The WireGuard backend could not do what was asked (message never holds keys)."""


class BackendConfigError(BackendError, ValueError):
    """Arguments no backend can apply; raised before anything is changed."""


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None
    # None means "leave the endpoint WireGuard currently has" (it may have roamed).
    endpoint: Address | None
    persistent_keepalive: int  # seconds, 0 = off
    allowed_ips: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class PeerState:
    public_key: bytes
    endpoint: Address | None
    last_handshake: float | None  # wall clock (time.time()), None = never
    rx_bytes: int
    tx_bytes: int


@runtime_checkable
class WireGuardBackend(Protocol):
    mode: str  # "kernel" | "userspace"

    def up(
        self, link: str, private_key: bytes, listen_port: int, fwmark: int, mtu: int
    ) -> None: ...

    def apply_peers(self, peers: Sequence[PeerConfig]) -> None:
        """Make the device's peers exactly `peers`, touching only those that changed."""
        ...

    def peer_states(self) -> dict[bytes, PeerState]: ...

    def down(self) -> None:
        """Remove the link and stop any process; safe to call more than once."""
        ...


# ---------------------------------------------------------------------- validation


def check_key(key: object, what: str) -> bytes:
    """A raw key of KEY_SIZE bytes; the message gives the size, never the key."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise BackendConfigError(f"{what} must be {KEY_SIZE} raw bytes (got {size})")
    return bytes(key)


def check_int(value: object, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BackendConfigError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def validate_device(
    link: object, private_key: object, listen_port: object, fwmark: object, mtu: object
) -> None:
    """The arguments of `WireGuardBackend.up`."""
    try:
        check_ifname(link)
    except InterfaceNameError as e:
        raise BackendConfigError(str(e)) from None
    check_key(private_key, "private key")
    check_int(listen_port, 0, 0xFFFF, "listen port")
    check_int(fwmark, 0, 0xFFFFFFFF, "fwmark")
    check_int(mtu, MIN_MTU, MAX_MTU, "MTU")


def validate_peers(peers: Sequence[PeerConfig]) -> dict[bytes, PeerConfig]:
    """Check every peer before anything is written; the normalised peers by public key.

    Normalised: an all-zero preshared key is no key, endpoints in canonical form,
    duplicate allowed IPs of one peer dropped. A prefix listed by two peers is refused:
    WireGuard would silently give it to whichever came last."""
    wanted: dict[bytes, PeerConfig] = {}
    index: dict[bytes, int] = {}
    owner: dict[IPNetwork, int] = {}
    for i, p in enumerate(peers):
        what = f"peer #{i}"
        if not isinstance(p, PeerConfig):
            raise BackendConfigError(f"{what}: not a PeerConfig but {type(p).__name__}")
        key = check_key(p.public_key, f"{what} public key")
        if key in wanted:
            raise BackendConfigError(f"{what}: public key appears twice (also peer #{index[key]})")
        psk = (
            None if p.preshared_key is None else check_key(p.preshared_key, f"{what} preshared key")
        )
        check_int(p.persistent_keepalive, 0, 0xFFFF, f"{what} persistent keepalive")
        try:
            endpoint = None if p.endpoint is None else check_endpoint(p.endpoint)
        except EndpointError as e:
            raise BackendConfigError(f"{what} endpoint: {e}") from None
        nets: dict[IPNetwork, None] = {}
        for n in p.allowed_ips:
            if not isinstance(n, (IPv4Network, IPv6Network)):
                raise BackendConfigError(
                    f"{what}: allowed IP {n!r} is not an IPv4Network or IPv6Network"
                )
            if owner.setdefault(n, i) != i:
                raise BackendConfigError(
                    f"{what}: allowed IP {n} already belongs to peer #{owner[n]}"
                )
            nets[n] = None
        wanted[key] = PeerConfig(
            key,
            None if psk == ZERO_KEY else psk,
            endpoint,
            p.persistent_keepalive,
            tuple(nets),
        )
        index[key] = i
    return wanted


# ---------------------------------------------------------------------- diff

# The PeerConfig fields a peer update may carry (the names of its attributes).
PEER_FIELDS = ("preshared_key", "endpoint", "persistent_keepalive", "allowed_ips")


@dataclass(frozen=True)
class PeerUpdate:
    peer: PeerConfig
    new: bool  # the device does not have the peer yet
    fields: frozenset[str]  # what to write; a None endpoint is never written


@dataclass(frozen=True)
class PeerDiff:
    removed: tuple[bytes, ...]
    updates: tuple[PeerUpdate, ...]  # in the wanted order
    unchanged: int

    def __bool__(self) -> bool:
        return bool(self.removed or self.updates)


def diff_peers(current: Mapping[bytes, PeerConfig], wanted: Mapping[bytes, PeerConfig]) -> PeerDiff:
    """What turns the device's peers `current` into `wanted` (as validate_peers returns)."""
    removed = tuple(key for key in current if key not in wanted)
    updates: list[PeerUpdate] = []
    for key, want in wanted.items():
        have = current.get(key)
        if have is None:
            fields = {f for f in PEER_FIELDS if f != "endpoint" or want.endpoint is not None}
            updates.append(PeerUpdate(want, True, frozenset(fields)))
        elif changed := changed_fields(want, have):
            updates.append(PeerUpdate(want, False, changed))
    return PeerDiff(removed, tuple(updates), len(wanted) - len(updates))


def changed_fields(want: PeerConfig, have: PeerConfig) -> frozenset[str]:
    changed = set()
    if want.preshared_key != have.preshared_key:
        changed.add("preshared_key")
    # None leaves WireGuard's endpoint alone: it may have roamed on purpose.
    if want.endpoint is not None and not same_endpoint(want.endpoint, have.endpoint):
        changed.add("endpoint")
    if want.persistent_keepalive != have.persistent_keepalive:
        changed.add("persistent_keepalive")
    if set(want.allowed_ips) != set(have.allowed_ips):  # the order means nothing
        changed.add("allowed_ips")
    return frozenset(changed)


def same_endpoint(a: Address, b: Address | None) -> bool:
    """Equal once normalised: what a device reports need not be in our text form."""
    try:
        return b is not None and check_endpoint(a) == check_endpoint(b)
    except EndpointError:
        return False  # a malformed report: write ours
