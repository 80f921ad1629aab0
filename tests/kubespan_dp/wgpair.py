"""Two WireGuardCores wired through an in-memory network with a simulated clock."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from kubespan_dp import crypto, messages
from kubespan_dp.core import Output, WireGuardCore
from kubespan_dp.peer import Peer

WALL_EPOCH = 1_700_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        ip_address(src).packed,
        ip_address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), 17, 64, ip_address(src).packed, ip_address(dst).packed
    )
    return header + payload


@dataclass
class Node:
    name: str
    core: WireGuardCore
    addr: tuple[str, int]
    tunnel_ip: str
    inbox: list[tuple[float, bytes]] = field(default_factory=list)
    sent: list[tuple[float, bytes, tuple[str, int]]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        key = self.core.public_key
        assert key is not None  # every node is made with a private key
        return key


class Pair:
    """Node a (initiator by convention) and node b; datagrams go through `wire`."""

    def __init__(self, seed: int = 1, psk: bytes | None = None, keepalive_b: int = 0) -> None:
        self.now = 0.0
        rng = random.Random(seed)
        self.a = self._node("a", rng, ("10.0.0.1", 51820), "192.168.0.1")
        self.b = self._node("b", rng, ("10.0.0.2", 51820), "fd00::2")
        self.a.core.set_peer(
            self.b.public_key,
            self.now,
            preshared_key=psk,
            endpoint=self.b.addr,
            allowed_ips=[ip_network("fd00::2/128"), ip_network("192.168.0.2/32")],
        )
        self.b.core.set_peer(
            self.a.public_key,
            self.now,
            preshared_key=psk,
            persistent_keepalive=keepalive_b,
            allowed_ips=[ip_network("192.168.0.1/32"), ip_network("fd00::1/128")],
        )
        # datagrams in flight: (data, source, destination)
        self.wire: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
        self.drop_to: set[str] = set()  # node names whose incoming datagrams are lost

    def _node(self, name: str, rng: random.Random, addr: tuple[str, int], tip: str) -> Node:
        key = crypto.clamp(rng.randbytes(32))
        core = WireGuardCore(
            key, rng=random.Random(rng.random()).randbytes, wall_clock=lambda: WALL_EPOCH + self.now
        )
        return Node(name, core, addr, tip)

    def node_at(self, addr: tuple[str, int]) -> Node | None:
        return next((n for n in (self.a, self.b) if n.addr == addr), None)

    def absorb(self, node: Node, out: Output, source: tuple[str, int] | None = None) -> None:
        for data, dest in out.datagrams:
            node.sent.append((self.now, data, dest))
            self.wire.append((data, source or node.addr, dest))
        node.inbox.extend((self.now, p) for p in out.packets)
        node.events.extend(out.events)

    def send(self, node: Node, packet: bytes) -> None:
        self.absorb(node, node.core.send_packet(packet, self.now))

    def deliver(self, limit: int = 1000) -> None:
        """Carry datagrams until the wire is quiet."""
        for _ in range(limit):
            if not self.wire:
                return
            data, src, dst = self.wire.pop(0)
            target = self.node_at(dst)
            if target is None or target.name in self.drop_to:
                continue
            self.absorb(target, target.core.receive_datagram(data, src, self.now))
        raise AssertionError("network did not settle")

    def run_until(self, t: float) -> None:
        """Advance the clock to t, firing every timer on the way, delivering at once."""
        while True:
            deadlines = [d for n in (self.a, self.b) if (d := n.core.next_deadline()) is not None]
            nxt = min(deadlines, default=None)
            if nxt is None or nxt > t:
                break
            self.now = max(self.now, nxt)
            for n in (self.a, self.b):
                d = n.core.next_deadline()
                if d is not None and d <= self.now:
                    self.absorb(n, n.core.on_timer(self.now))
            self.deliver()
        self.now = t

    def handshake(self) -> None:
        self.send(self.a, ipv4_packet("192.168.0.1", "192.168.0.2", b"first"))
        self.deliver()

    def peer_of(self, node: Node) -> Peer:
        other = self.b if node is self.a else self.a
        return node.core.peers[other.public_key]


def kinds(datagrams: list[tuple[float, bytes, tuple[str, int]]]) -> list[int]:
    return [messages.message_type(d) for _, d, _ in datagrams]
