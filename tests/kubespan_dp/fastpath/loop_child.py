"""A PacketLoop in a child process with faults.c preloaded (test_loop_faults.py runs
it): `python -m tests.kubespan_dp.fastpath.loop_child truncated|lock|seal` prints one JSON
line of what it saw, then exits at once (a loop whose lock stayed held could not
be stopped).

No root: the UDP socket is on 127.0.0.1 and the "TUN device" is a datagram
socketpair (a read or write of one IP packet each, as on TUN).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from tests.kubespan_dp.wgpair import ipv4_packet

PEER_INNER = "10.78.0.2"
OUR_INNER = "10.78.0.1"


class Child:
    """One loop, `n` peers (slot i: its own keypair, routes 10.78.i.2/32); the test
    plays peer 0 from a UDP socket of its own."""

    def __init__(self, n: int = 1) -> None:
        self.tun, tun_loop = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun_loop.setblocking(False)  # as a TUN fd: the loop reads until EAGAIN
        self.tun.settimeout(5)
        self.tun_loop = tun_loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(5)
        self.loop = fp.PacketLoop(tun_loop.fileno(), self.sock.fileno(), -1, 1420)
        self.keys: list[tuple[bytes, bytes]] = []
        routes = []
        for i in range(n):
            send, receive = os.urandom(32), os.urandom(32)  # ours
            self.keys.append((send, receive))
            self.loop.add_peer(i)
            self.loop.set_endpoint(i, self.peer.getsockname())
            kp = fp.Keypair(send, receive, 0x1000 + i, 0x2000 + i, created=time.monotonic())
            self.loop.set_keypairs(i, kp, None)
            routes.append((socket.inet_aton(f"10.78.{i}.2"), 32, i))
        self.loop.set_allowed_ips(routes)
        self.loop.start()
        self.counter = 0

    def transport(self, inner: bytes, pid: int = 0) -> bytes:
        """A message from peer `pid` to us."""
        self.counter += 1
        sealed = bt.AEADKey(self.keys[pid][1]).seal(self.counter, inner)
        return struct.pack("<IIQ", 4, 0x1000 + pid, self.counter) + sealed

    def to_loop(self, data: bytes) -> None:
        self.peer.sendto(data, self.sock.getsockname())


def _wait(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def truncated() -> dict[str, Any]:
    """With 148-byte receive buffers (KS_TEST_RECV_BUFFER): datagrams longer than
    that are counted, not processed; the others are."""
    c = Child()
    small = ipv4_packet(PEER_INNER, OUR_INNER, b"x" * 20)
    c.to_loop(c.transport(ipv4_packet(PEER_INNER, OUR_INNER, b"y" * 200)))  # truncated
    c.to_loop(struct.pack("<I", 1) + bytes(196))  # an initiation cut to its own size
    c.to_loop(c.transport(small))
    c.to_loop(struct.pack("<I", 1) + bytes(144))  # an initiation of the right size
    _wait(lambda: c.loop.drops().get("udp_truncated", 0) >= 2 and c.loop.rx_packets >= 1)
    _wait(lambda: c.loop.handshake_backlog >= 1)
    return {
        "drops": c.loop.drops(),
        "delivered": [c.tun.recv(65536).hex()],
        "expected": small.hex(),
        "handshakes": [len(h[0]) for h in c.loop.take_handshakes()],
    }


def lock() -> dict[str, Any]:
    """remove_peer fails while it holds the write lock (its new index table cannot
    be allocated): the lock is released, other lock users and both threads go on."""
    c = Child(20)
    # after removing slot 1, 19 keypairs: the table has 64 slots of uint32 keys
    ctypes.CDLL(None).ks_test_fail_calloc(ctypes.c_size_t(64), ctypes.c_size_t(4))
    try:
        c.loop.remove_peer(1)
        failed = None
    except MemoryError as e:
        failed = type(e).__name__
    out: dict[str, Any] = {"remove_peer": failed}
    # another writer: returns only if the lock was released
    t = threading.Thread(target=c.loop.add_peer, args=(21,), daemon=True)
    t.start()
    t.join(5)
    out["add_peer_returned"] = not t.is_alive()
    if t.is_alive():
        return out
    # the receiving thread delivers (peer 0 -> us) ...
    inner = ipv4_packet(PEER_INNER, OUR_INNER, b"after")
    c.to_loop(c.transport(inner))
    out["delivered"] = c.tun.recv(65536) == inner
    # ... and the sending thread seals and sends (us -> peer 0)
    c.tun.send(ipv4_packet(OUR_INNER, PEER_INNER, b"back"))
    data = c.peer.recv(65536)
    counter = struct.unpack_from("<Q", data, 8)[0]
    plain = bt.AEADKey(c.keys[0][0]).open(counter, data[16:])
    out["sent"] = plain.startswith(ipv4_packet(OUR_INNER, PEER_INNER, b"back"))
    c.loop.remove_peer(1)  # and it works when memory does not run out
    out["removed_later"] = True
    return out


def seal() -> dict[str, Any]:
    """The first three of five packets fail to seal (OpenSSL reports an error):
    they are counted and never sent; the other two are sent, sealed."""
    c = Child()
    ctypes.CDLL(None).ks_test_fail_seals(3)
    for i in range(5):
        c.tun.send(ipv4_packet(OUR_INNER, PEER_INNER, b"seal%d" % i))
    _wait(lambda: c.loop.drops().get("seal_failed", 0) >= 3 and c.loop.tx_packets >= 2)
    opened = []
    for _ in range(2):
        data = c.peer.recv(65536)
        counter = struct.unpack_from("<Q", data, 8)[0]
        opened.append(bt.AEADKey(c.keys[0][0]).open(counter, data[16:])[20:25].decode())
    c.peer.setblocking(False)
    try:
        c.peer.recv(65536)
        more = True
    except BlockingIOError:
        more = False
    return {"drops": c.loop.drops(), "opened": opened, "more": more}


def main() -> None:
    scenarios = {"truncated": truncated, "lock": lock, "seal": seal}
    result = scenarios[sys.argv[1]]()
    print(json.dumps(result), flush=True)
    os._exit(0)  # do not stop the loop: its threads may be stuck on a held lock


if __name__ == "__main__":
    main()
