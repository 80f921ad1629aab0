"""Hostile peers against our daemon AND against both wireguard-go builds, modern and
old (the same scenario passing on wireguard-go shows it is a fair one).  Namespaces,
real sockets."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests import netns
from tests.kubespan_dp.hostile.peers import (
    HOSTILE_OUTER,
    VICTIM_INNER,
    VICTIM_OUTER,
    VICTIM_PORT,
    HostileNet,
    echo_request,
)

pytestmark = pytest.mark.netns

KINDS = ["kubespan-wg", *netns.WGGO_KINDS]
KIND_IDS = ["kubespan-wg", *netns.WGGO_IDS.values()]
COLLIDING = 0x0BADC0DE
UDP_SEGMENT = 103


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")
    return str(request.param)


def test_colliding_sender_indices(lab: netns.Lab, kind: str) -> None:
    """Two peers handshake with one sender index; one re-handshakes reusing the index
    of its live session.  For 30 s (keepalive 1 s, traffic both ways) every message
    the victim sends opens with that peer's keys and no (key, counter) repeats; a
    third peer still completes a handshake afterwards."""
    net = HostileNet(lab, kind, keepalive=1)
    a, b = net.add_peer(COLLIDING), net.add_peer(COLLIDING)
    net.handshake(a)
    net.handshake(b)
    end = time.monotonic() + 30
    rounds = 0
    while time.monotonic() < end:
        net.traffic(4)
        net.handshake(a)  # again with the index of its live session
        rounds += 1
    for p in (a, b):
        assert p.transport_in > 100, (p.n, p.transport_in)
        assert p.reply_count > 50, (p.n, p.reply_count)
    third = net.add_peer(COLLIDING)
    net.handshake(third, timeout=20)
    net.traffic(2)
    assert third.replies and net.alive()


FLOOD_SECONDS = float(os.environ.get("FLOOD_SECONDS", "30"))  # at most (handshake time)
MIN_FLOOD = 10.0  # at least


def _flooder(seconds: float, rate: int, gso: bool = False) -> str:
    """A separate process sending `rate` datagrams/s: random garbage, type-4 messages
    with unknown indices, short and odd sizes, handshake-shaped garbage.  FLOOD_KINDS
    (indices into `kinds`, comma-separated) narrows the mix when investigating."""
    return f"""
import os, signal, socket, struct, time, random
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))  # ends the flood early
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{HOSTILE_OUTER}", 0))
dst = ("{VICTIM_OUTER}", {VICTIM_PORT})
s.connect(dst)  # a connected socket: no address to parse per send
rnd = random.Random(5)
kinds = [
    (40, lambda: struct.pack("<IIQ", 4, rnd.getrandbits(32), rnd.getrandbits(64)) + os.urandom(24)),
    (24, lambda: os.urandom(24)),
    (33, lambda: b"\\x01" + os.urandom(32)),
    (3, lambda: os.urandom(3)),
    (31, lambda: b"\\x04\\x00\\x00\\x00" + os.urandom(27)),
    (148, lambda: os.urandom(148)),
    (149, lambda: b"\\x01" + os.urandom(148)),
    (200, lambda: os.urandom(200)),
    (148, lambda: b"\\x01\\x00\\x00\\x00" + os.urandom(144)),  # initiation-shaped
    (92, lambda: b"\\x02\\x00\\x00\\x00" + os.urandom(88)),  # response-shaped
]
pick = os.environ.get("FLOOD_KINDS")
if pick:
    kinds = [kinds[int(k)] for k in pick.split(",")]
gso = {gso}
if gso:  # one send carries 64 datagrams of one size (the kernel splits them)
    sends = []
    for size, make in kinds:
        for _ in range(4):
            sends.append((b"".join(make() for _ in range(64)),
                          [(socket.SOL_UDP, {UDP_SEGMENT}, struct.pack("H", size))], 64))
else:
    sends = [([make()], [], 1) for size, make in kinds for _ in range(64)]
    sends = [(d[0], c, k) for d, c, k in sends]
rnd.shuffle(sends)
n = len(sends)
sent = 0
start = time.monotonic()
end = start + {seconds}
sendmsg = s.sendmsg
send = s.send
i = 0
while (now := time.monotonic()) < end and not stopped:
    if sent > {rate} * (now - start):  # paced: {rate} datagrams/s
        time.sleep(0.0002)
        continue
    for _ in range(64):
        payload, control, count = sends[i % n]
        i += 1
        try:
            if control:
                sendmsg([payload], control)
            else:
                send(payload)
            sent += count
        except OSError:
            pass
print(sent, time.monotonic() - start)
"""


FLOODS = {
    # one datagram per send
    # (three: under load the victim's share of 2 cores caps what two could send)
    "plain": (3, 50_000, False),
    # UDP GSO: 64 datagrams per send, split by the kernel on the way
    "gso": (1, 1_000_000, True),
}


@pytest.mark.parametrize("mode", list(FLOODS))
def test_unauthenticated_flood(lab: netns.Lab, kind: str, mode: str) -> None:
    """A flood (FLOODS: >= 100k datagrams/s one by one, 1M/s offered through GSO)
    lasting FLOOD_SECONDS, while a real peer completes a handshake within 5 attempts
    and pings through."""
    net = HostileNet(lab, kind, keepalive=0, quiet=True)
    real = net.add_peer(None)
    procs, each, gso = FLOODS[mode]
    script = _flooder(FLOOD_SECONDS, each, gso)
    floods = [
        net.ns_h.popen([sys.executable, "-c", script], stdout=subprocess.PIPE) for _ in range(procs)
    ]
    try:
        # the flood is under way before the handshake starts
        net.pump(0.5)
        started = time.monotonic()
        net.send_echo(real, 1)
        net.pump(FLOOD_SECONDS - 2, until=lambda: real.handshakes > 0)
        shook = time.monotonic() - started
        seq = 1
        while len(real.replies) < 3 and time.monotonic() - started < FLOOD_SECONDS - 1:
            seq += 1
            net.send_echo(real, seq)
            net.pump(0.2, until=lambda s=seq: s in real.replies)  # type: ignore[misc]
        pinged = time.monotonic() - started
        assert all(f.poll() is None for f in floods), "the flood ended too early"
        alive = net.alive()
        # the flood lasts at least MIN_FLOOD seconds, then may stop early
        while time.monotonic() - started < MIN_FLOOD:
            net.pump(0.5)
    finally:
        for f in floods:
            f.terminate()
        outs = [f.communicate(timeout=FLOOD_SECONDS + 10)[0] for f in floods]
    results = [[float(x) for x in out.decode().split()] for out in outs]
    sent = sum(r[0] for r in results)
    seconds = min(r[1] for r in results)
    rate = sent / seconds
    print(
        f"\n{kind}: flood {sent:.0f} datagrams in {seconds:.1f} s = {rate:,.0f}/s; "
        f"handshake after {real.initiations} initiation(s) in {shook:.1f} s, "
        f"{len(real.replies)} echo replies by {pinged:.1f} s"
    )
    assert real.handshakes >= 1 and real.initiations <= 5, real.initiations
    assert len(real.replies) >= 3, "pings did not get through the tunnel under the flood"
    assert alive and net.alive()
    # Our daemon must withstand >= 100k/s.  wireguard-go, run only to show the scenario
    # is fair, spends more CPU per datagram, and on 2 shared cores that leaves the
    # flooders less: the rate they reach against it is reported, held to half.
    least = 100_000 if kind == "kubespan-wg" else 50_000
    assert seconds >= MIN_FLOOD and rate >= least, f"the flood reached only {rate:,.0f} datagrams/s"


def test_gso_super_datagram_of_128_messages(
    lab: netns.Lab, kind: str, request: pytest.FixtureRequest
) -> None:
    """One UDP GSO send of 128 valid transport messages (and then a burst of 32 such)
    from an authenticated peer over veth: every inner packet is delivered."""
    if kind == "wireguard-go":
        # Seen with Debian's 0.0.20231211: over veth the datagram reaches its UDP_GRO
        # socket whole, and splitting it into 128 overflows its 128-message read batch
        # (it reads at the batch's end): "splitting coalesced packet resulted in
        # overflow", all 128 dropped (127 still pass). Strict: a fix shows up here.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="wireguard-go drops a 128-segment GRO read")
        )
    net = HostileNet(lab, kind, keepalive=0)
    p = net.add_peer(None)
    net.handshake(p)
    net.pump(0.5)
    kp = p.core.peers[net.public].keypairs.current
    assert kp is not None

    def super_datagram(first_seq: int) -> tuple[bytes, int]:
        msgs = []
        for i in range(128):
            inner = echo_request(p.inner, VICTIM_INNER, 0x4B53, first_seq + i, size=52)
            counter = kp.send_counter  # the hostile side's own core: it owns it
            kp.send_counter += 1
            sealed = kp.send.seal(counter, inner)  # 80 bytes: no padding needed
            msgs.append(struct.pack("<IIQ", 4, kp.remote_index, counter) + sealed)
        assert len({len(m) for m in msgs}) == 1
        return b"".join(msgs), len(msgs[0])

    payload, seg = super_datagram(1)
    p.sock.sendmsg(
        [payload],
        [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))],
        0,
        (VICTIM_OUTER, VICTIM_PORT),
    )
    net.pump(10, until=lambda: len(p.replies) >= 128)
    assert len(p.replies) == 128, f"{len(p.replies)} of 128 delivered"
    # a burst: more segments than one receive batch of the C loop ever held
    for k in range(32):
        payload, seg = super_datagram(1000 + 128 * k)
        p.sock.sendmsg(
            [payload],
            [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))],
            0,
            (VICTIM_OUTER, VICTIM_PORT),
        )
    net.pump(5, until=lambda: len(p.replies) >= 128 * 33)
    assert net.alive()
    # UDP may drop part of a 4096-message burst in socket buffers (wireguard-go reads
    # them one by one); what must hold: nothing broke, the next one arrives whole
    assert len(p.replies) > 128, len(p.replies)
    payload, seg = super_datagram(10_000)
    p.sock.sendmsg(
        [payload],
        [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))],
        0,
        (VICTIM_OUTER, VICTIM_PORT),
    )
    net.pump(10, until=lambda: set(range(10_000, 10_128)) <= p.replies)
    assert set(range(10_000, 10_128)) <= p.replies, "the super-datagram after the burst"


def test_fuzzed_datagrams(lab: netns.Lab, kind: str) -> None:
    """10^5 mutated datagrams into a running daemon: alive, the session intact."""
    net = HostileNet(lab, kind, keepalive=0, quiet=True)
    p = net.add_peer(None)
    net.handshake(p)
    net.send_echo(p, 1)
    net.pump(3, until=lambda: 1 in p.replies)
    session = p.sessions[-1].local_index
    kp = p.core.peers[net.public].keypairs.current
    assert kp is not None
    hs = p.core.peers[net.public].handshake
    seeds = [
        struct.pack("<IIQ", 4, kp.remote_index, 10**6) + os.urandom(48),
        b"\x01\x00\x00\x00" + os.urandom(144),
        b"\x02\x00\x00\x00"
        + struct.pack("<I", 1)
        + struct.pack("<I", hs.local_index)
        + os.urandom(80),
        b"\x03\x00\x00\x00" + struct.pack("<I", hs.local_index) + os.urandom(56),
    ]
    rnd = __import__("random").Random(99)
    with net.ns_h.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent = 0
    try:
        while sent < 100_000:
            base = bytearray(rnd.choice(seeds))
            op = rnd.randrange(4)
            if op == 0:
                for _ in range(rnd.randrange(1, 8)):
                    base[rnd.randrange(len(base))] ^= 1 << rnd.randrange(8)
            elif op == 1:
                base = base[: rnd.randrange(len(base) + 1)]
            elif op == 2:
                base += os.urandom(rnd.randrange(1, 64))
            else:
                base[4:8] = os.urandom(4)
            try:
                s.sendto(bytes(base), (VICTIM_OUTER, VICTIM_PORT))
                sent += 1
            except BlockingIOError:
                net.pump(0.001)
    finally:
        s.close()
    assert net.alive()
    before = p.handshakes
    for i in range(5):
        net.send_echo(p, 100 + i)
    net.pump(5, until=lambda: len({100, 101, 102, 103, 104} & p.replies) == 5)
    assert {100, 101, 102, 103, 104} <= p.replies
    assert p.handshakes == before and p.sessions[-1].local_index == session
