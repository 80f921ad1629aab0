"""Two WireGuard cores talking through memory: ``python -m kubespan_dp.demo``.

Shows the sans-I/O core on its own: a handshake, packets both ways, a rekey
after REKEY_AFTER_TIME, and the passive keepalive, all on a simulated clock.
No sockets, no TUN device, nothing leaves the process.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from ipaddress import ip_address, ip_network

from . import crypto, messages
from .core import HandshakeCompleted, KeypairInstalled, KeypairRetired, Output, WireGuardCore

_KIND = {1: "initiation", 2: "response", 3: "cookie-reply", 4: "transport"}


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            0,
            0,
            64,
            17,
            0,
            ip_address(src).packed,
            ip_address(dst).packed,
        )
        + payload
    )


class Demo:
    def __init__(self) -> None:
        self.now = 0.0
        start = time.time()

        def wall_clock() -> float:
            # TAI64N timestamps must advance with the simulated clock, or the
            # responder would take a rekey initiation for a replay.
            return start + self.now

        def core() -> WireGuardCore:
            return WireGuardCore(crypto.clamp(os.urandom(32)), wall_clock=wall_clock)

        self.nodes = {
            "alice": (core(), ("198.51.100.1", 51820), "10.99.0.1"),
            "bob": (core(), ("198.51.100.2", 51820), "10.99.0.2"),
        }
        (a, _a_addr, a_ip), (b, b_addr, b_ip) = self.nodes["alice"], self.nodes["bob"]
        assert a.public_key is not None and b.public_key is not None  # both have a private key
        a.set_peer(b.public_key, 0.0, endpoint=b_addr, allowed_ips=[ip_network(b_ip + "/32")])
        b.set_peer(a.public_key, 0.0, allowed_ips=[ip_network(a_ip + "/32")])
        self.wire: list[tuple[str, bytes, tuple[str, int]]] = []

    def _handle(self, name: str, out: Output) -> None:
        for data, dest in out.datagrams:
            kind = _KIND[messages.message_type(data)]
            if kind == "transport" and len(data) == messages.KEEPALIVE_SIZE:
                kind = "keepalive"
            print(f"  t={self.now:7.2f}s {name:>5} -> {dest[0]}:{dest[1]}  {kind} ({len(data)} B)")
            self.wire.append((name, data, dest))
        for packet in out.packets:
            print(f"  t={self.now:7.2f}s {name:>5} <- tunnel packet {packet[20:]!r}")
        for event in out.events:
            if isinstance(event, KeypairInstalled):
                role = "initiator" if event.is_initiator else "responder"
                print(
                    f"  t={self.now:7.2f}s {name:>5}    keypair {event.local_index:#010x} "
                    f"installed ({role})"
                )
            elif isinstance(event, KeypairRetired):
                print(
                    f"  t={self.now:7.2f}s {name:>5}    keypair {event.local_index:#010x} retired"
                )
            elif isinstance(event, HandshakeCompleted):
                print(f"  t={self.now:7.2f}s {name:>5}    handshake complete")

    def _deliver(self) -> None:
        while self.wire:
            sender, data, dest = self.wire.pop(0)
            for name, (core, addr, _) in self.nodes.items():
                if addr == dest:
                    self._handle(name, core.receive_datagram(data, self.nodes[sender][1], self.now))

    def send(self, src: str, dst: str, text: bytes) -> None:
        core, _, src_ip = self.nodes[src]
        self._handle(src, core.send_packet(_ipv4(src_ip, self.nodes[dst][2], text), self.now))
        self._deliver()

    def advance(self, until: float) -> None:
        while True:
            due = [
                (d, n)
                for n, (c, _, _) in self.nodes.items()
                if (d := c.next_deadline()) is not None and d <= until
            ]
            if not due:
                break
            self.now, name = min(due)
            self._handle(name, self.nodes[name][0].on_timer(self.now))
            self._deliver()
        self.now = until


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=3, help="packets each way")
    args = parser.parse_args(argv)
    demo = Demo()
    print("1. alice sends to bob; the packet waits for a handshake:")
    demo.send("alice", "bob", b"hello bob")
    print("2. traffic both ways:")
    for i in range(args.packets):
        demo.now += 1
        demo.send("alice", "bob", b"ping %d" % i)
        demo.send("bob", "alice", b"pong %d" % i)
    print("3. quiet: whoever received data last sends a keepalive 10 s later:")
    demo.advance(20)
    print("4. after REKEY_AFTER_TIME (120 s) alice's next packet starts a new handshake:")
    demo.now = 125
    demo.send("alice", "bob", b"after rekey")
    demo.send("bob", "alice", b"ack")
    for name, (core, _, _) in demo.nodes.items():
        peer = next(iter(core.peers.values()))
        print(
            f"{name}: rx {peer.rx_bytes} B, tx {peer.tx_bytes} B, endpoint {peer.endpoint}, "
            f"drops {dict(core.dropped) or 'none'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
