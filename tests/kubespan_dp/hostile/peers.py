"""Hostile WireGuard peers scripted in Python on the sans-I/O core.

`Victim` is a daemon under test (ours or wireguard-go) in its own namespace; the
hostile side is a second namespace joined by a veth, where this process opens one
UDP socket per scripted peer.  Each `Peer` is a `WireGuardCore` that uses the sender
index it is told (so several can collide on purpose) and keeps every session key it
ever had, so each transport message the victim sends can be checked: it must open
with a key of the peer it was sent to, and no (key, counter) pair may repeat.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_network

from kubespan_dp import crypto
from kubespan_dp.core import WireGuardCore
from kubespan_dp.keypair import KeypairInstalled
from tests import netns

VICTIM_OUTER = "192.168.91.1"
HOSTILE_OUTER = "192.168.91.2"
VICTIM_INNER = "10.91.0.1"
VICTIM_PORT = 51820


def inner_of(n: int) -> str:
    return f"10.91.0.{10 + n}"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(src: str, dst: str, ident: int, seq: int, size: int = 32) -> bytes:
    """An IPv4 ICMP echo request (checksums right: the victim's kernel answers)."""
    payload = bytes(size)
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    total = 20 + len(icmp)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0x4000,
        64,
        1,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def echo_reply_seq(packet: bytes) -> int | None:
    """The sequence number if `packet` is an IPv4 ICMP echo reply."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 15) * 4
    if packet[ihl] != 0:
        return None
    return int(struct.unpack_from("!H", packet, ihl + 6)[0])


@dataclass
class Session:
    local_index: int
    aead: crypto.AEAD


@dataclass
class Peer:
    n: int
    index: int | None  # the sender index forced on every handshake; None: random
    core: WireGuardCore
    sock: socket.socket
    addr: tuple[str, int]
    key: bytes
    sessions: list[Session] = field(default_factory=list)
    handshakes: int = 0  # completed
    initiations: int = 0  # sent
    replies: set[int] = field(default_factory=set)  # distinct echo sequence numbers
    reply_count: int = 0
    seen: set[tuple[int, int]] = field(default_factory=set)  # (session, counter)
    transport_in: int = 0

    @property
    def inner(self) -> str:
        return inner_of(self.n)


class Violation(AssertionError):
    pass


class HostileNet:
    """The hostile namespace: scripted peers against one victim daemon."""

    def __init__(self, lab: netns.Lab, kind: str, keepalive: int = 1, quiet: bool = False) -> None:
        """`quiet`: wireguard-go logs every garbage datagram at its verbose level, and
        its output pipe is read only at the end: under a flood it would block on it."""
        self.lab = lab
        self.kind = kind
        self.keepalive = keepalive
        self.ns_v = lab.netns("hv")
        self.ns_h = lab.netns("hh")
        va, vb = lab.veth(self.ns_v, self.ns_h)
        self.veth_v, self.veth_h = va, vb
        netns.add_address(self.ns_v, va, f"{VICTIM_OUTER}/24")
        netns.add_address(self.ns_h, vb, f"{HOSTILE_OUTER}/24")
        self.daemon = lab.daemon(self.ns_v, kind, env={"LOG_LEVEL": "error"} if quiet else None)
        self.ifname = self.daemon.ifname
        self.private = crypto.clamp(os.urandom(32))
        self.public = crypto.public_key(self.private)
        self._uapi(f"private_key={self.private.hex()}\nlisten_port={VICTIM_PORT}\n")
        netns.add_address(self.ns_v, self.ifname, f"{VICTIM_INNER}/24")
        self.ns_v.run("ip", "link", "set", self.ifname, "mtu", "1420", "up")
        self.peers: list[Peer] = []
        self.rng = random.Random(12)
        self.now0 = time.monotonic()
        lab.defer(self.close)

    def _uapi(self, body: str) -> None:
        reply = netns.uapi_request(self.ifname, f"set=1\n{body}\n")
        assert reply.strip() == "errno=0", reply

    def close(self) -> None:
        for p in self.peers:
            p.sock.close()

    def add_peer(self, index: int | None) -> Peer:
        n = len(self.peers)
        private = crypto.clamp(os.urandom(32))
        core = WireGuardCore(private, rng=os.urandom)
        with self.ns_h.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOSTILE_OUTER, 40000 + n))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        key = core.public_key
        assert key is not None
        peer = Peer(n, index, core, sock, (HOSTILE_OUTER, 40000 + n), key)
        if index is not None:
            table = core.index_table

            def new_index(value: object) -> int:
                assert peer.index is not None
                table.entries[peer.index] = value  # type: ignore[assignment]
                return peer.index

            table.new_index = new_index  # type: ignore[method-assign]
        core.set_peer(
            self.public,
            0.0,
            endpoint=(VICTIM_OUTER, VICTIM_PORT),
            allowed_ips=[ip_network(f"{VICTIM_INNER}/32")],
        )
        self._uapi(
            f"public_key={key.hex()}\nendpoint={HOSTILE_OUTER}:{40000 + n}\n"
            f"persistent_keepalive_interval={self.keepalive}\n"
            f"allowed_ip={inner_of(n)}/32\n"
        )
        self.peers.append(peer)
        return peer

    # ------------------------------------------------------------ the event loop

    def _absorb(self, peer: Peer, out: object) -> None:
        for data, dest in out.datagrams:  # type: ignore[attr-defined]
            assert dest == (VICTIM_OUTER, VICTIM_PORT), dest
            if data[0] == 1:
                peer.initiations += 1
            try:
                peer.sock.sendto(data, dest)
            except BlockingIOError:
                pass
        for packet in out.packets:  # type: ignore[attr-defined]
            seq = echo_reply_seq(packet)
            if seq is not None:
                peer.replies.add(seq)
                peer.reply_count += 1
        for event in out.events:  # type: ignore[attr-defined]
            if isinstance(event, KeypairInstalled):
                peer.sessions.append(Session(event.local_index, crypto.AEAD(event.receive_key)))
            elif type(event).__name__ == "HandshakeCompleted":
                peer.handshakes += 1

    def check_transport(self, peer: Peer, data: bytes) -> None:
        """What the victim sent `peer` opens with `peer`'s keys only, once."""
        if len(data) < 32:
            raise Violation(f"a {len(data)}-byte transport message")
        _, receiver, counter = struct.unpack_from("<IIQ", data)
        peer.transport_in += 1
        for i, s in enumerate(peer.sessions):
            if s.local_index != receiver:
                continue
            try:
                s.aead.open(counter, data[16:])
            except crypto.AuthenticationError:
                continue
            if (i, counter) in peer.seen:
                raise Violation(f"peer {peer.n}: counter {counter} reused on one key")
            peer.seen.add((i, counter))
            return
        for other in self.peers:
            if other is peer:
                continue
            for s in other.sessions:
                try:
                    s.aead.open(counter, data[16:])
                except crypto.AuthenticationError:
                    continue
                raise Violation(f"a message for peer {peer.n} was sealed for peer {other.n}")
        raise Violation(f"a message for peer {peer.n} opens with none of its keys")

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Run the scripted peers for `seconds` (or until `until()` holds)."""
        end = time.monotonic() + seconds
        by_fd = {p.sock.fileno(): p for p in self.peers}
        while True:
            now = time.monotonic()
            if now >= end or (until is not None and until()):
                return
            deadlines = [d for p in self.peers if (d := p.core.next_deadline()) is not None]
            wait = min([end - now] + [max(0.0, d - now) for d in deadlines] + [0.05])
            ready, _, _ = select.select(list(by_fd), [], [], wait)
            now = time.monotonic()
            for fd in ready:
                peer = by_fd[fd]
                for _ in range(256):
                    try:
                        data, src = peer.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if src != (VICTIM_OUTER, VICTIM_PORT):
                        continue
                    if data and data[0] == 4:
                        self.check_transport(peer, data)
                    self._absorb(peer, peer.core.receive_datagram(data, src, now))
            for p in self.peers:
                d = p.core.next_deadline()
                if d is not None and d <= now:
                    self._absorb(p, p.core.on_timer(now))

    def send_echo(self, peer: Peer, seq: int, size: int = 32) -> None:
        packet = echo_request(peer.inner, VICTIM_INNER, 0x4B53, seq, size)
        self._absorb(peer, peer.core.send_packet(packet, time.monotonic()))

    def handshake(self, peer: Peer, timeout: float = 30) -> None:
        """`peer` initiates (again, even with a live session) and waits for it."""
        before = peer.handshakes
        hs = peer.core.peers[self.public].handshake
        hs.last_sent_handshake = None
        peer.core._send_handshake_initiation(  # noqa: SLF001 - a forced re-handshake
            peer.core.peers[self.public], time.monotonic(), is_retry=False
        )
        self._absorb(peer, peer.core._take())  # noqa: SLF001
        self.pump(timeout, until=lambda: peer.handshakes > before)
        assert peer.handshakes > before, f"peer {peer.n}: no handshake in {timeout}s"

    def traffic(self, seconds: float, interval: float = 0.1) -> None:
        """Echo requests from every peer to the victim (replies come back) plus the
        victim's keepalives, for `seconds`."""
        end = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < end:
            seq += 1
            for p in self.peers:
                self.send_echo(p, seq & 0xFFFF)
            self.pump(interval)

    def alive(self) -> bool:
        return self.daemon.alive() and "errno=0" in netns.uapi_request(self.ifname, "get=1\n\n")
