"""One owner per session: the core and the C loop share a keypair's send counter
through one owner, and sessions are never looked up by the index a peer chose.

No namespaces: our core sits behind a `FastDataPath` whose C loop is not started
(the mirror into C, the counters and the index table are all exercised), and two
hostile peers are sans-I/O cores that pick the sender index we tell them to.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from ipaddress import ip_network

import pytest

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from kubespan_dp import crypto, messages
from kubespan_dp.core import Output, WireGuardCore
from kubespan_dp.fastloop import FastDataPath
from kubespan_dp.keypair import Keypair
from kubespan_dp.peer import Peer
from kubespan_dp.timers import REJECT_AFTER_MESSAGES
from tests.kubespan_dp.wgpair import ipv4_packet

US = ("10.0.0.1", 51820)
COLLIDING = 0xC0111DE5  # the sender index both hostile peers use


class Hostile:
    """A peer whose every handshake uses the sender index it is told."""

    def __init__(self, mesh: Mesh, n: int, rng: random.Random, index: int) -> None:
        self.addr = (f"10.0.0.{10 + n}", 51820)
        self.inner = f"192.168.0.{10 + n}"
        self.core = WireGuardCore(
            crypto.clamp(rng.randbytes(32)),
            rng=rng.randbytes,
            wall_clock=lambda: 1_700_000_000.0 + mesh.now,  # TAI64N follows the test clock
        )
        self.index = index
        assert self.core.public_key is not None
        self.key: bytes = self.core.public_key
        table = self.core.index_table

        def new_index(value: object) -> int:
            table.entries[self.index] = value  # type: ignore[assignment]
            return self.index

        table.new_index = new_index  # type: ignore[method-assign]
        self.got: list[bytes] = []


class Mesh:
    def __init__(self, n_peers: int = 2, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.now = 1000.0
        self.core = WireGuardCore(
            crypto.clamp(rng.randbytes(32)),
            rng=rng.randbytes,
            wall_clock=lambda: 1_700_000_000.0 + self.now,
        )
        assert self.core.public_key is not None
        self.us: bytes = self.core.public_key
        self.tun_r, self.tun_w = os.pipe()
        self.handshakes: list[tuple[bytes, tuple[str, int]]] = []
        self.path = FastDataPath(
            self.core,
            self.tun_w,
            lambda data, source, now: self.handshakes.append((data, source)),
            lambda: None,
            lambda: None,
        )
        self.wire: list[tuple[bytes, tuple[str, int]]] = []
        self.path.py.send = lambda data, addr: self.wire.append((data, addr))  # type: ignore[method-assign]
        self.peers = [Hostile(self, i, rng, COLLIDING) for i in range(n_peers)]
        for p in self.peers:
            self.core.set_peer(
                p.key,
                self.now,
                endpoint=p.addr,
                allowed_ips=[ip_network(f"{p.inner}/32")],
            )
            p.core.set_peer(
                self.us,
                self.now,
                endpoint=US,
                allowed_ips=[ip_network("0.0.0.0/0")],
            )
        self.path.reconcile()
        # every (session, counter) our side ever sealed, and what peers sent us
        self.seen: set[tuple[int, int]] = set()

    def close(self) -> None:
        os.close(self.tun_r)
        os.close(self.tun_w)

    def _to_us(self, out: Output, peer: Hostile) -> None:
        for data, addr in out.datagrams:
            assert addr == US
            self.path.emit(self.core.receive_datagram(data, peer.addr, self.now))
        # the device's handshake queue, drained at once
        while self.handshakes:
            data, source = self.handshakes.pop(0)
            self.path.emit(self.core.receive_datagram(data, source, self.now))
        peer.got += out.packets

    def settle(self) -> None:
        for _ in range(100):
            if not self.wire:
                return
            data, addr = self.wire.pop(0)
            peer = next(p for p in self.peers if p.addr == addr)
            self.check_ours(data, peer)
            self._to_us(peer.core.receive_datagram(data, US, self.now), peer)
        raise AssertionError("did not settle")

    def check_ours(self, data: bytes, peer: Hostile) -> None:
        """A transport message we sent `peer` opens with one of `peer`'s sessions,
        and no (session, counter) pair ever repeats."""
        if data[0] != messages.TRANSPORT:
            return
        _, receiver, counter = struct.unpack_from("<IIQ", data)
        assert receiver == peer.index
        theirs = [k for k in peer.core.peers[self.us].keypairs.all()]
        for k in theirs:
            try:
                k.receive.open(counter, data[16:])
            except crypto.AuthenticationError:
                continue
            key = (id(k), counter)
            assert key not in self.seen, f"nonce reused: counter {counter}"
            self.seen.add(key)
            return
        raise AssertionError(f"a datagram for {peer.addr} does not open with its keys")

    def handshake(self, peer: Hostile) -> None:
        """`peer` initiates (with its chosen index) and confirms with a data packet."""
        self._to_us(peer.core.send_packet(ipv4_packet(peer.inner, "10.9.9.9"), self.now), peer)
        self.settle()

    def core_sends(self, peer: Hostile, n: int = 3) -> None:
        """The core seals on the session C runs (what the slow path and timers do)."""
        for _ in range(n):
            self.path.emit(self.core.send_packet(ipv4_packet("10.9.9.9", peer.inner), self.now))
        self.settle()

    def c_sends(self, peer: Hostile, n: int = 3) -> None:
        """The C loop seals on the session it runs for `peer`."""
        kp = self.core.peers[peer.key].keypairs.current
        assert kp is not None
        c_kp = self.path._installed[id(kp)].c_kp  # the session as mirrored in C
        batch = bt.PacketBatch(8)
        for _ in range(n):
            batch.add_plaintext(ipv4_packet("10.9.9.9", peer.inner))
        assert bt.seal_batch(c_kp, batch) == n
        for data in batch.packets():
            self.wire.append((data, peer.addr))
        self.settle()


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    m = Mesh()
    yield m
    m.close()


def test_two_peers_with_one_sender_index(mesh: Mesh) -> None:
    a, b = mesh.peers
    mesh.handshake(a)
    mesh.handshake(b)
    for _ in range(3):
        for p in (a, b):
            mesh.c_sends(p)
            mesh.core_sends(p)
    for p in (a, b):
        assert len(p.got) == 3 * 3 * 2
    assert not mesh.core.dropped


def test_rehandshake_with_the_index_of_the_live_session(mesh: Mesh) -> None:
    a, b = mesh.peers
    mesh.handshake(a)
    mesh.handshake(b)
    mesh.c_sends(a)
    mesh.core_sends(a)
    # a's next session carries the same sender index as its live one
    mesh.now += 130
    a.core.peers[mesh.us].handshake.last_sent_handshake = None
    mesh.handshake(a)
    for p in (a, b, a):
        mesh.core_sends(p)
        mesh.c_sends(p)
        mesh.core_sends(p)
    assert len(a.got) == 3 + 3 + 2 * 9 and len(b.got) == 9
    # and the previous session of a, retired in C, is not written to either
    prev = mesh.core.peers[a.key].keypairs.previous
    assert prev is not None and prev.remote_index == COLLIDING


def test_core_counter_follows_c() -> None:
    """REKEY_AFTER_MESSAGES: the core sees the counter C advanced."""
    c_kp = fp.Keypair(bytes(32), bytes(32), 1, 2, send_counter=5)
    kp = Keypair(bytes(32), bytes(32), 1, 2, True, 0.0)
    kp.send_counter = 5
    kp.hand_counter_to(c_kp)
    batch = bt.PacketBatch(4)
    batch.fill_plaintext(b"", 4)
    bt.seal_batch(c_kp, batch)
    assert kp.send_counter == 9
    assert kp.take_counter() == 9 and c_kp.send_counter == 10
    with pytest.raises(ValueError):
        kp.send_counter = 3
    kp.send_counter = REJECT_AFTER_MESSAGES  # expiry reaches C
    assert c_kp.reserve_counter() >= REJECT_AFTER_MESSAGES


def test_sessions_reach_c_from_the_cores_events(mesh: Mesh) -> None:
    """C learns a session from the events of the output that carries it, for the
    peers those events name, without walking every peer."""
    import hashlib

    for n in range(300):
        mesh.core.set_peer(hashlib.sha256(n.to_bytes(2, "little")).digest(), mesh.now)
    mesh.path.reconcile()
    touched: list[bytes] = []
    real = mesh.path._push_sessions

    def spy(key: bytes) -> None:
        touched.append(key)
        real(key)

    mesh.path._push_sessions = spy  # type: ignore[method-assign]
    a = mesh.peers[0]
    mesh.handshake(a)
    assert touched and set(touched) == {a.key}
    kp = mesh.core.peers[a.key].keypairs.current
    assert kp is not None and id(kp) in mesh.path._installed  # in C, counter handed over
    assert isinstance(kp.counter_owner, fp.Keypair)


# ------------------------------------------------------------------ the receive window


def _slow(mesh: Mesh, data: bytes, source: tuple[str, int]) -> None:
    """A datagram the C loop queued for Python (a session C did not run yet)."""
    mesh.path._slow_item((fp.SLOW_DATAGRAM, data, source, -1, None), mesh.now)


def _c_opens(c_kp: fp.Keypair, data: bytes) -> bool:
    """The C loop's receive path (THE open: replay check, tag, window update)."""
    batch = bt.PacketBatch(1)
    batch.add_message(data)
    return bt.open_batch(c_kp, batch) == 1


def _tun_packets(mesh: Mesh) -> list[bytes]:
    """What the Python side wrote to the TUN device (a pipe here) so far."""
    os.set_blocking(mesh.tun_r, False)
    data = b""
    while True:
        try:
            chunk = os.read(mesh.tun_r, 65536)
        except BlockingIOError:
            break
        data += chunk
    out = []
    while data:
        n = struct.unpack_from("!H", data, 2)[0]
        out.append(data[:n])
        data = data[n:]
    return out


def _handshake_due(mesh: Mesh, peer: Peer) -> None:
    """The next packet to `peer` starts a handshake (its session is used up), with
    a later TAI64N timestamp than the last one."""
    mesh.now += 1
    peer.handshake.last_sent_handshake = None
    if peer.keypairs.current is not None:
        peer.keypairs.current.send_counter = REJECT_AFTER_MESSAGES


def _peer_initiates(mesh: Mesh, peer: Hostile, n: int) -> list[bytes]:
    """`peer` initiates and gets our response; the first `n` transport messages it
    then sends us (counters 0..n-1) are returned, not delivered.  Our side of the
    session is the responder's `next`: only the core runs it."""
    _handshake_due(mesh, peer.core.peers[mesh.us])
    init = peer.core.send_packet(ipv4_packet(peer.inner, "10.9.9.9", b"p0"), mesh.now)
    for data, _ in init.datagrams:
        mesh.path.emit(mesh.core.receive_datagram(data, peer.addr, mesh.now))
    (response, addr), *_ = mesh.wire
    mesh.wire.clear()
    assert addr == peer.addr and response[0] == messages.RESPONSE
    sent = [d for d, _ in peer.core.receive_datagram(response, US, mesh.now).datagrams]
    for i in range(1, n):
        out = peer.core.send_packet(ipv4_packet(peer.inner, "10.9.9.9", b"p%d" % i), mesh.now)
        sent += [d for d, _ in out.datagrams]
    assert [struct.unpack_from("<Q", d, 8)[0] for d in sent] == list(range(n))
    return sent


def test_one_receive_window_around_the_handover(mesh: Mesh) -> None:
    """Data the C loop queued for Python before the session reached C is opened by
    the core after C took the session over: every counter is accepted once, by
    whichever side sees it first, never by both."""
    a = mesh.peers[0]
    c0, c1, c2 = _peer_initiates(mesh, a, 3)
    _slow(mesh, c0, a.addr)  # the first packet confirms the session: C takes it over
    kp = mesh.core.peers[a.key].keypairs.current
    assert kp is not None and kp.local_index == struct.unpack_from("<I", c0, 4)[0]
    c_kp = mesh.path._installed[id(kp)].c_kp
    assert _tun_packets(mesh) == [ipv4_packet(a.inner, "10.9.9.9", b"p0")]

    # c1 reaches C (a copy, or the peer's retransmission) and, queued before the
    # hand-over, the core: one acceptance
    assert _c_opens(c_kp, c1)
    _slow(mesh, c1, a.addr)
    assert _tun_packets(mesh) == []
    assert mesh.core.dropped == {"replay": 1}
    # the other order: the core first (through C's window), then C
    _slow(mesh, c2, a.addr)
    assert _tun_packets(mesh) == [ipv4_packet(a.inner, "10.9.9.9", b"p2")]
    assert not _c_opens(c_kp, c2)
    # and what the core accepted before the hand-over C refuses too
    assert not _c_opens(c_kp, c0)
    assert c_kp.rx_packets == 1 and mesh.core.dropped == {"replay": 1}


def test_core_window_until_the_handover(mesh: Mesh) -> None:
    """Before C runs a session the core's own window decides (C has no copy)."""
    a = mesh.peers[0]
    c0, c1 = _peer_initiates(mesh, a, 2)
    nxt = mesh.core.peers[a.key].keypairs.next
    assert nxt is not None and nxt.window is nxt.replay
    assert id(nxt) not in mesh.path._installed
    assert mesh.path._pending == {nxt.local_index}  # C queues its data for Python
    _slow(mesh, c1, a.addr)  # reordered: c1 confirms the session
    _slow(mesh, c0, a.addr)
    _slow(mesh, c1, a.addr)
    assert len(_tun_packets(mesh)) == 2 and mesh.core.dropped == {"replay": 1}
    assert nxt.window is not nxt.replay and not mesh.path._pending


# ------------------------------------------------------------------ events only


def _assert_mirrored(mesh: Mesh, peer: Hostile) -> None:
    """The fast path's copy of the slots (built from events alone) is the core's."""
    ks = mesh.core.peers[peer.key].keypairs
    slots = mesh.path._slots.get(peer.key)
    got = (slots.current, slots.previous, slots.next) if slots else (None, None, None)
    assert all(g is w for g, w in zip(got, (ks.current, ks.previous, ks.next), strict=True))
    in_c = mesh.path._keypairs.get(mesh.path._ids[peer.key], (None, None))
    assert in_c[0] is ks.current and in_c[1] is ks.previous
    for kp in (ks.current, ks.previous):
        if kp is not None:
            assert isinstance(kp.counter_owner, fp.Keypair) and kp.window is not kp.replay
    assert mesh.path._pending == ({ks.next.local_index} if ks.next else set())


def test_events_alone_keep_the_slots(mesh: Mesh) -> None:
    """Every way the core moves keypairs between slots reaches C through events:
    we respond, we initiate, we initiate while a responder session waits."""
    a = mesh.peers[0]
    ours = mesh.core.peers[a.key]
    mesh.handshake(a)  # we respond; a's data confirms
    _assert_mirrored(mesh, a)
    for _ in range(2):  # we initiate: current and previous move
        _handshake_due(mesh, ours)
        mesh.core_sends(a, 1)
        assert ours.keypairs.current is not None and ours.keypairs.current.is_initiator
        _assert_mirrored(mesh, a)
    # a initiates, and before its first data on that session arrives we initiate
    _peer_initiates(mesh, a, 1)
    assert ours.keypairs.next is not None
    _assert_mirrored(mesh, a)  # our next waits in the core
    _handshake_due(mesh, ours)
    mesh.core_sends(a, 1)
    assert ours.keypairs.next is None and ours.keypairs.previous is not None
    _assert_mirrored(mesh, a)  # the waiting session became previous, now in C
    mesh.core.remove_peer(a.key)
    mesh.path.emit(mesh.core.on_timer(mesh.now))
    assert a.key not in mesh.path._slots and not mesh.path._pending


# ------------------------------------------------------------------ roaming


def test_roam_reaches_c_with_the_output(mesh: Mesh) -> None:
    """An endpoint the core learns (data queued for Python before the hand-over,
    a handshake) is C's as soon as the core's output is handled: no tick runs."""
    a = mesh.peers[0]
    c0, c1 = _peer_initiates(mesh, a, 2)
    _slow(mesh, c0, a.addr)
    pid = mesh.path._ids[a.key]
    assert mesh.path.c.get_endpoint(pid) == a.addr
    moved = ("10.0.7.7", 4242)
    _slow(mesh, c1, moved)  # no session change: only the endpoint
    assert mesh.core.peers[a.key].endpoint == moved
    assert mesh.path.c.get_endpoint(pid) == moved
    # a handshake from yet another address
    again = ("10.0.8.8", 4343)
    _handshake_due(mesh, a.core.peers[mesh.us])
    init = a.core.send_packet(ipv4_packet(a.inner, "10.9.9.9"), mesh.now)
    assert init.datagrams[0][0][0] == messages.INITIATION
    mesh.path.emit(mesh.core.receive_datagram(init.datagrams[0][0], again, mesh.now))
    assert mesh.path.c.get_endpoint(pid) == again
    assert mesh.path.loop is None  # nothing scheduled a tick
