"""Kernel WireGuard backend: a link of kind `wireguard` driven over netlink (pyroute2).

The link itself (create, MTU, up, delete) goes through rtnetlink (`IPRoute`); keys,
port, fwmark and peers go through the `wireguard` generic-netlink family
(`WireGuard`). Peers are applied as a diff against what the kernel reports, so a peer
whose configuration did not change is never written and keeps its session.

A device dump is split by the kernel into several messages when it does not fit one
(many peers, or one peer with many allowed IPs); a peer cut in two reappears in the
next message with only its public key and the rest of its allowed IPs. `_read_device`
merges them back.

Synchronous, and it opens a netlink socket per operation: pyroute2's sync sockets run
their own asyncio loop and must not be used on a uvloop loop or shared across threads.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from control.backends.base import (
    ZERO_KEY,
    BackendError,
    PeerConfig,
    PeerState,
    PeerUpdate,
    diff_peers,
    validate_device,
    validate_peers,
)
from kubespan_dp.netutil import Address, IPNetwork

log = logging.getLogger(__name__)

NLM_F_DUMP_INTR = 0x10  # the device changed while it was being dumped
DUMP_RETRIES = 5


@dataclass
class _DevicePeer:
    """A peer as the kernel reports it, merged over all dump messages."""

    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: Address | None = None
    persistent_keepalive: int = 0
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)


@dataclass
class DeviceInfo:
    ifname: str
    public_key: bytes | None
    listen_port: int
    fwmark: int
    peers: dict[bytes, _DevicePeer]


class KernelBackend:
    """`WireGuardBackend` on the Linux kernel module. `netns` names an `ip netns` to
    work in (None = the caller's namespace)."""

    mode = "kernel"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.link: str | None = None

    # ------------------------------------------------------------------ sockets

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _wg(self) -> WireGuard:
        return WireGuard(netns=self.netns) if self.netns else WireGuard()

    def _require_link(self) -> str:
        if self.link is None:
            raise BackendError("the kernel WireGuard link is not up (call up() first)")
        return self.link

    # ------------------------------------------------------------------ link

    def up(self, link: str, private_key: bytes, listen_port: int, fwmark: int, mtu: int) -> None:
        """Create (or adopt an existing) wireguard link, configure it and set it up.

        An existing link of kind wireguard with this name is reused with its peers, so
        an agent restart does not break sessions; on failure a link this call created
        is removed again.
        """
        validate_device(link, private_key, listen_port, fwmark, mtu)
        created = False
        with self._ipr() as ipr:
            index = _lookup(ipr, link)
            if index is not None:
                kind = _link_kind(ipr, index)
                if kind != "wireguard":
                    raise BackendError(f"link {link} exists and is of kind {kind!r}, not wireguard")
                log.info("adopting existing wireguard link %s", link)
            else:
                try:
                    ipr.link("add", ifname=link, kind="wireguard")
                except NetlinkError as e:
                    raise BackendError(
                        f"cannot create wireguard link {link}: {_strerror(e)}"
                    ) from None
                created = True
                index = _lookup(ipr, link)
                if index is None:
                    raise BackendError(f"wireguard link {link} vanished right after creation")
            try:
                with self._wg() as wg:
                    wg.set(
                        link, private_key=_b64(private_key), listen_port=listen_port, fwmark=fwmark
                    )
                ipr.link("set", index=index, mtu=mtu, state="up")
            except NetlinkError as e:
                if created:
                    _delete_quietly(ipr, index)
                raise BackendError(
                    f"cannot configure wireguard link {link}: {_strerror(e)}"
                ) from None
        self.link = link
        log.info(
            "kernel wireguard link %s up (port %d, fwmark %#x, mtu %d)",
            link,
            listen_port,
            fwmark,
            mtu,
        )

    def down(self) -> None:
        if self.link is None:
            return
        with self._ipr() as ipr:
            index = _lookup(ipr, self.link)
            if index is not None:
                try:
                    ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise BackendError(
                            f"cannot delete link {self.link}: {_strerror(e)}"
                        ) from None
        log.info("kernel wireguard link %s removed", self.link)
        self.link = None

    # ------------------------------------------------------------------ peers

    def apply_peers(self, peers: Sequence[PeerConfig]) -> None:
        link = self._require_link()
        wanted = validate_peers(peers)  # before reading the device: bad input touches nothing
        diff = diff_peers(self.device_peers(), wanted)
        if not diff:
            return
        with self._wg() as wg:
            # Removals first: they free allowed IPs that a changed peer may take over.
            for key in diff.removed:
                _wg_set(wg, link, {"public_key": _b64(key), "remove": True})
            for update in diff.updates:
                _wg_set(wg, link, _peer_request(update))
        log.info(
            "%s: %d peers added or changed, %d removed, %d untouched",
            link,
            len(diff.updates),
            len(diff.removed),
            diff.unchanged,
        )

    def peer_states(self) -> dict[bytes, PeerState]:
        return {
            key: PeerState(key, p.endpoint, p.last_handshake, p.rx_bytes, p.tx_bytes)
            for key, p in self.read_device().peers.items()
        }

    def device_peers(self) -> dict[bytes, PeerConfig]:
        """The peers' configuration as the kernel holds it (for status and tests)."""
        return {
            key: PeerConfig(
                key, p.preshared_key, p.endpoint, p.persistent_keepalive, tuple(p.allowed_ips)
            )
            for key, p in self.read_device().peers.items()
        }

    def read_device(self) -> DeviceInfo:
        link = self._require_link()
        for _ in range(DUMP_RETRIES):
            with self._wg() as wg:
                try:
                    messages = wg.info(link)
                except NetlinkError as e:
                    raise BackendError(
                        f"cannot read wireguard link {link}: {_strerror(e)}"
                    ) from None
            if not any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in messages):
                return merge_dump(link, messages)
        raise BackendError(f"the dump of {link} kept changing under us ({DUMP_RETRIES} tries)")


# ---------------------------------------------------------------------- dump parsing


def merge_dump(ifname: str, messages: Iterable) -> DeviceInfo:
    """Fold the messages of one WG_CMD_GET_DEVICE dump into a single device view."""
    info = DeviceInfo(ifname, None, 0, 0, {})
    for msg in messages:
        if (value := msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) is not None:
            info.public_key = _unb64(value)
        if (value := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
            info.listen_port = value
        if (value := msg.get_attr("WGDEVICE_A_FWMARK")) is not None:
            info.fwmark = value
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _unb64(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
            peer = info.peers.setdefault(key, _DevicePeer(key))
            _merge_peer(peer, nla)
    return info


def _merge_peer(peer: _DevicePeer, nla) -> None:
    if (psk := nla.get_attr("WGPEER_A_PRESHARED_KEY")) is not None:
        raw = _unb64(psk)
        peer.preshared_key = None if raw == ZERO_KEY else raw
    if (ep := nla.get_attr("WGPEER_A_ENDPOINT")) is not None and ep.get("addr"):
        peer.endpoint = (ep["addr"], ep["port"])
    if (ka := nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")) is not None:
        peer.persistent_keepalive = ka
    if (hs := nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
        peer.last_handshake = (hs["tv_sec"] + hs["tv_nsec"] / 1e9) if hs["tv_sec"] else None
    if (rx := nla.get_attr("WGPEER_A_RX_BYTES")) is not None:
        peer.rx_bytes = rx
    if (tx := nla.get_attr("WGPEER_A_TX_BYTES")) is not None:
        peer.tx_bytes = tx
    for aip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ():
        peer.allowed_ips.append(ipaddress.ip_network(aip["addr"], strict=False))


# ---------------------------------------------------------------------- writing


def _peer_request(update: PeerUpdate) -> dict:
    """The whole peer, except an endpoint that did not change (it may have roamed)."""
    want = update.peer
    req: dict = {
        "public_key": _b64(want.public_key),
        "preshared_key": _b64(want.preshared_key or ZERO_KEY),
        "persistent_keepalive": want.persistent_keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": [str(n) for n in want.allowed_ips],
    }
    if "endpoint" in update.fields:
        assert want.endpoint is not None
        req["endpoint_addr"], req["endpoint_port"] = want.endpoint
    return req


# ---------------------------------------------------------------------- helpers


def _wg_set(wg: WireGuard, link: str, peer: dict) -> None:
    try:
        wg.set(link, peer=peer)
    except NetlinkError as e:
        raise BackendError(f"cannot configure a peer on {link}: {_strerror(e)}") from None


def _lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _delete_quietly(ipr: IPRoute, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError:
        pass


def _strerror(e: NetlinkError) -> str:
    return f"{e.args[1] if len(e.args) > 1 else e} (errno {e.code})"


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _unb64(value: bytes | str) -> bytes:
    return base64.b64decode(value)
