"""Two cores wired in memory with a simulated clock (aioquic/h11-style pair tests)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_network
from itertools import pairwise

import pytest

from kubespan_dp import messages
from kubespan_dp.cookie import CookieGenerator
from kubespan_dp.core import HandshakeCompleted, KeypairInstalled, KeypairRetired, WireGuardCore
from kubespan_dp.noise import Reason
from kubespan_dp.timers import REKEY_TIMEOUT_JITTER_MAX_MS, Timer
from tests.kubespan_dp.wgpair import Pair, ipv4_packet, ipv6_packet, kinds

A_IP, B_IP = "192.168.0.1", "192.168.0.2"


def test_handshake_and_data_both_ways() -> None:
    p = Pair(psk=bytes(range(32)))
    first = ipv4_packet(A_IP, B_IP, b"first")
    p.send(p.a, first)
    assert kinds(p.a.sent) == [messages.INITIATION]  # staged until the session exists
    p.deliver()
    assert [pkt for _, pkt in p.b.inbox] == [first]
    back = ipv6_packet("fd00::2", "fd00::1", b"back")
    p.send(p.b, back)
    p.deliver()
    assert [pkt for _, pkt in p.a.inbox] == [back]
    assert kinds(p.a.sent) == [messages.INITIATION, messages.TRANSPORT]
    assert kinds(p.b.sent) == [messages.RESPONSE, messages.TRANSPORT]

    pa, pb = p.peer_of(p.a), p.peer_of(p.b)
    assert pa.last_handshake == 0.0 and pb.last_handshake == 0.0
    assert pb.endpoint == p.a.addr  # learned from the initiation
    assert pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert pa.tx_bytes == sum(len(d) for _, d, _ in p.a.sent)
    for node in (p.a, p.b):
        installed = [e for e in node.events if isinstance(e, KeypairInstalled)]
        assert len(installed) == 1
        assert any(isinstance(e, HandshakeCompleted) for e in node.events)
        assert "send_key" not in repr(installed[0])  # keys stay out of reprs/logs
        assert not node.core.dropped
    # Padding: the 25-byte packet travelled as 32 bytes of plaintext.
    data_msgs = [d for _, d, _ in p.a.sent if messages.message_type(d) == 4 and len(d) > 32]
    assert len(data_msgs[0]) == 16 + 32 + 16
    assert p.peer_of(p.a).preshared_key == bytes(range(32))


def test_ipv6_outer_and_inner_routing() -> None:
    p = Pair()
    p.handshake()
    p.send(p.a, ipv6_packet("fd00::1", "fd00::2", b"x" * 100))
    p.deliver()
    assert p.b.inbox[-1][1] == ipv6_packet("fd00::1", "fd00::2", b"x" * 100)


def test_no_route_and_invalid_packets_dropped() -> None:
    p = Pair()
    p.send(p.a, ipv4_packet(A_IP, "192.168.0.77"))
    p.send(p.a, b"\x45\x00")
    p.send(p.a, b"")
    assert p.a.core.dropped == {"no_route": 1, "invalid_packet": 2}
    assert not p.a.sent


def test_rekey_after_120s_without_loss() -> None:
    p = Pair()
    p.handshake()
    sent = {"a": 0, "b": 0}
    t = 0.0
    while t < 400:
        t += 1.0
        p.run_until(t)
        p.send(p.a, ipv4_packet(A_IP, B_IP, b"a%d" % t))
        p.send(p.b, ipv4_packet(B_IP, A_IP, b"b%d" % t))
        sent["a"] += 1
        sent["b"] += 1
        p.deliver()
    assert len(p.b.inbox) == sent["a"] + 1  # + the first packet
    assert len(p.a.inbox) == sent["b"]
    installed = [e for e in p.a.events if isinstance(e, KeypairInstalled)]
    # a is the initiator of every rekey: roughly every 120 s.
    assert len(installed) == 4
    assert all(e.is_initiator for e in installed)
    gaps = [b.created - a.created for a, b in pairwise(installed)]
    assert all(120 < g < 123 for g in gaps), gaps
    assert any(isinstance(e, KeypairRetired) for e in p.a.events)
    assert not p.a.core.dropped and not p.b.core.dropped
    assert len(p.a.core.index_table) <= 3 and len(p.b.core.index_table) <= 3


def test_keypair_rejected_after_180s() -> None:
    p = Pair()
    p.handshake()
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"late"))
    late = p.wire.pop()  # held back in the network
    p.deliver()
    p.run_until(180.5)
    p.b.core.receive_datagram(late[0], late[1], p.now)
    assert p.b.core.dropped["keypair_expired"] == 1
    # Sending now needs a new handshake rather than the stale keypair.
    before = len(p.a.sent)
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"new"))
    assert kinds(p.a.sent[before:]) == [messages.INITIATION]
    p.deliver()
    assert p.b.inbox[-1][1] == ipv4_packet(A_IP, B_IP, b"new")


def test_retransmit_every_5s_and_give_up() -> None:
    p = Pair()
    p.drop_to.add("b")
    p.send(p.a, ipv4_packet(A_IP, B_IP))
    p.run_until(300)
    times = [t for t, d, _ in p.a.sent if messages.message_type(d) == messages.INITIATION]
    # wireguard-go: the first try plus MAX_TIMER_HANDSHAKES + 1 retries, then give up.
    assert len(times) == 20
    gaps = [b - a for a, b in pairwise(times)]
    assert all(5.0 <= g < 5.0 + REKEY_TIMEOUT_JITTER_MAX_MS / 1000 for g in gaps), gaps
    assert len(set(round(g, 3) for g in gaps)) > 1  # jitter applied
    assert 90 < times[-1] < 102
    assert p.a.core.dropped["staged_flushed"] == 1
    # Key material residue is zeroed 3 x 180 s after giving up; nothing else pending.
    assert p.peer_of(p.a).timers.zero_key_material is not None
    p.run_until(1000)
    assert p.a.core.next_deadline() is None
    # A new packet starts over.
    p.drop_to.clear()
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"again"))
    p.deliver()
    assert p.b.inbox[-1][1] == ipv4_packet(A_IP, B_IP, b"again")


def test_passive_keepalive_after_10s() -> None:
    p = Pair()
    p.handshake()
    start = len(p.b.sent)
    p.run_until(9.9)
    assert len(p.b.sent) == start
    p.run_until(10.1)
    new = p.b.sent[start:]
    assert [(t, len(d)) for t, d, _ in new] == [(10.0, 32)]
    # Nothing more: no data in either direction since.
    p.run_until(60)
    assert len(p.b.sent) == start + 1


def test_persistent_keepalive_interval() -> None:
    p = Pair(keepalive_b=25)
    p.handshake()
    p.run_until(200)
    keepalives = [t for t, d, _ in p.b.sent if len(d) == 32]
    # 0 s: the keepalive staged when the interval was switched on, sent once the
    # session is confirmed; 10 s: passive keepalive for the data received; then
    # every 25 s since the last packet sent.
    assert keepalives == [0.0, 10.0, 35.0, 60.0, 85.0, 110.0, 135.0, 160.0, 185.0]


def test_persistent_keepalive_switched_on_sends_at_once() -> None:
    p = Pair()
    p.handshake()
    p.now = 3.0
    p.a.core.set_peer(p.b.public_key, p.now, persistent_keepalive=7)
    assert p.a.core.next_deadline() == 3.0
    out = p.a.core.on_timer(p.now)
    assert [len(d) for d, _ in out.datagrams] == [32]


def test_cookie_flow_under_load() -> None:
    p = Pair()
    p.b.core.under_load = True
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"under load"))
    p.deliver()
    assert kinds(p.b.sent) == [messages.COOKIE_REPLY]
    assert p.b.core.dropped["under_load_cookie_sent"] == 1
    assert p.peer_of(p.a).cookie_generator.cookie_set == 0.0
    p.run_until(6)  # retransmit, now with mac2
    assert kinds(p.b.sent) == [messages.COOKIE_REPLY, messages.RESPONSE]
    assert p.b.inbox[-1][1] == ipv4_packet(A_IP, B_IP, b"under load")
    assert p.peer_of(p.b).last_handshake is not None


def test_rate_limit_under_load() -> None:
    p = Pair()
    p.b.core.under_load = True
    p.send(p.a, ipv4_packet(A_IP, B_IP))
    p.deliver()
    p.now = 5.4
    p.absorb(p.a, p.a.core.on_timer(p.now))
    init = next(d for d, _, _ in p.wire)
    p.wire.clear()
    # The same valid mac2 initiation flooded from one source: 4 pass the limiter at once.
    for _ in range(10):
        p.b.core.receive_datagram(init, p.a.addr, p.now)
    assert p.b.core.dropped["rate_limited"] == 6


def test_replayed_data_and_initiation_dropped() -> None:
    p = Pair()
    p.send(p.a, ipv4_packet(A_IP, B_IP))
    initiation = p.wire[0]
    p.deliver()
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"once"))
    data = p.wire[0]
    p.deliver()
    n = len(p.b.inbox)
    p.b.core.receive_datagram(data[0], data[1], p.now)
    assert p.b.core.dropped["replay"] == 1 and len(p.b.inbox) == n
    p.now = 1.0
    out = p.b.core.receive_datagram(initiation[0], initiation[1], p.now)
    assert not out.datagrams
    assert p.b.core.dropped["handshake_replay"] == 1


def test_inner_source_not_allowed_dropped() -> None:
    p = Pair()
    p.handshake()
    n = len(p.b.inbox)
    p.send(p.a, ipv4_packet("192.168.0.99", B_IP, b"spoofed"))
    p.deliver()
    assert len(p.b.inbox) == n
    assert p.b.core.dropped["source_not_allowed"] == 1


def test_roaming_endpoint_follows_authenticated_source() -> None:
    p = Pair()
    p.handshake()
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"roam"))
    data, _, dst = p.wire.pop()
    p.b.core.receive_datagram(data, ("10.9.9.9", 4000), p.now)
    assert p.peer_of(p.b).endpoint == ("10.9.9.9", 4000)
    # An unauthenticated datagram from elsewhere does not move it.
    forged = bytearray(data)
    forged[-1] ^= 1
    p.b.core.receive_datagram(bytes(forged), ("10.8.8.8", 1), p.now)
    assert p.peer_of(p.b).endpoint == ("10.9.9.9", 4000)


def test_zero_key_material_after_540s() -> None:
    p = Pair()
    p.handshake()
    p.run_until(541)
    for node in (p.a, p.b):
        peer = p.peer_of(node)
        assert peer.keypairs.all() == []
        assert any(isinstance(e, KeypairRetired) for e in node.events)
        assert len(node.core.index_table) == 0


def test_config_validation_changes_nothing() -> None:
    core = WireGuardCore(bytes(range(32)))
    for kwargs in (
        {"preshared_key": b"short"},
        {"endpoint": ("not-an-ip", 1)},
        {"endpoint": ("10.0.0.1", 0)},
        {"persistent_keepalive": 70000},
        {"allowed_ips": ["10.0.0.0/33"]},
    ):
        with pytest.raises(ValueError):
            core.set_peer(bytes(32), 0.0, **kwargs)
    assert core.peers == {}
    assert core.public_key is not None
    with pytest.raises(ValueError):
        core.set_peer(core.public_key, 0.0)
    with pytest.raises(ValueError):
        core.set_peer(b"x", 0.0)
    peer = core.set_peer(bytes(range(1, 33)), 0.0, allowed_ips=[ip_network("10.1.0.0/16")])
    core.set_peer(peer.public_key, 0.0, allowed_ips=["10.2.0.0/16"], replace_allowed_ips=True)
    assert peer.allowed_ips == [ip_network("10.2.0.0/16")]
    core.remove_peer(peer.public_key)
    assert core.peers == {} and core.allowed_ips.lookup(bytes([10, 2, 0, 1])) is None


def test_private_key_change_renegotiates() -> None:
    p = Pair()
    p.handshake()
    import random

    new_key = bytes(random.Random(5).randbytes(32))
    p.b.core.set_private_key(new_key, p.now)
    p.a.core.set_peer(
        p.b.public_key, p.now, endpoint=p.b.addr, allowed_ips=[ip_network("192.168.0.2/32")]
    )
    p.now = 1.0
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"after key change"))
    p.deliver()
    assert p.b.inbox[-1][1] == ipv4_packet(A_IP, B_IP, b"after key change")


def test_secrets_stay_out_of_reprs() -> None:
    psk = bytes(range(100, 132))
    p = Pair(psk=psk)
    p.handshake()
    peer = p.peer_of(p.a)
    kp = peer.keypairs.current
    private_key = p.a.core.private_key
    assert kp is not None and private_key is not None
    text = " ".join(repr(x) for x in (peer, peer.handshake, kp, p.a.events))
    for secret in (psk, kp.send_key, kp.receive_key, private_key):
        assert secret.hex() not in text and repr(secret) not in text


def test_under_load_with_unparseable_source_does_not_raise() -> None:
    p = Pair()
    p.b.core.under_load = True
    p.send(p.a, ipv4_packet(A_IP, B_IP))
    init = p.wire[0][0]
    out = p.b.core.receive_datagram(init, ("not-an-ip", 1), 0.0)
    assert not out.datagrams and p.b.core.dropped["invalid_source"] == 1


# -- handshake rejections: each path counts its own reason --------------------------

# Field offsets inside the wire messages (see kubespan_dp/messages.py).
INIT_STATIC, INIT_TIMESTAMP, RESP_EMPTY = 40, 88, 44
HANDSHAKE_REASONS = {r.value for r in Reason}


def _flipped(data: bytes, offset: int, receiver_public: bytes) -> bytes:
    """``data`` with one byte changed and mac1 made valid again, to get past mac1."""
    changed = bytearray(data)
    changed[offset] ^= 1
    return CookieGenerator(receiver_public).add_macs(bytes(changed), 0.0)


def _initiation(p: Pair) -> tuple[bytes, tuple[str, int]]:
    """A's next initiation to B, taken off the wire."""
    p.send(p.a, ipv4_packet(A_IP, B_IP))
    data, source, _ = p.wire.pop()
    assert messages.message_type(data) == messages.INITIATION
    return data, source


def _corrupt_static(p: Pair) -> WireGuardCore:
    data, source = _initiation(p)
    p.b.core.receive_datagram(_flipped(data, INIT_STATIC, p.b.public_key), source, p.now)
    return p.b.core


def _corrupt_timestamp(p: Pair) -> WireGuardCore:
    data, source = _initiation(p)
    p.b.core.receive_datagram(_flipped(data, INIT_TIMESTAMP, p.b.public_key), source, p.now)
    return p.b.core


def _unknown_peer(p: Pair) -> WireGuardCore:
    data, source = _initiation(p)
    p.b.core.remove_peer(p.a.public_key)
    p.b.core.receive_datagram(data, source, p.now)
    return p.b.core


def _replay(p: Pair) -> WireGuardCore:
    data, source = _initiation(p)
    p.b.core.receive_datagram(data, source, p.now)
    p.b.core.receive_datagram(data, source, p.now + 1.0)
    return p.b.core


def _flood(p: Pair) -> WireGuardCore:
    first, source = _initiation(p)
    p.now = 6.0  # past REKEY_TIMEOUT, so A initiates again, with a newer timestamp
    second, _ = _initiation(p)
    p.b.core.receive_datagram(first, source, p.now)
    p.b.core.receive_datagram(second, source, p.now)
    return p.b.core


def _corrupt_response(p: Pair) -> WireGuardCore:
    data, source = _initiation(p)
    p.absorb(p.b, p.b.core.receive_datagram(data, source, p.now))
    response, source, _ = p.wire.pop()
    assert messages.message_type(response) == messages.RESPONSE
    p.a.core.receive_datagram(_flipped(response, RESP_EMPTY, p.a.public_key), source, p.now)
    return p.a.core


def _low_order_peer(p: Pair) -> WireGuardCore:
    # An all-zero public key is a low-order point: no static-static secret, no initiation.
    p.a.core.set_peer(bytes(32), p.now, endpoint=("10.0.0.9", 1), allowed_ips=["192.168.0.9/32"])
    p.send(p.a, ipv4_packet(A_IP, "192.168.0.9"))
    return p.a.core


@pytest.mark.parametrize(
    ("reason", "reject"),
    [
        (Reason.INVALID_INITIATION, _corrupt_static),
        (Reason.INVALID_INITIATION, _corrupt_timestamp),
        (Reason.UNKNOWN_PEER, _unknown_peer),
        (Reason.REPLAY, _replay),
        (Reason.FLOOD, _flood),
        (Reason.INVALID_RESPONSE, _corrupt_response),
        (Reason.NOT_POSSIBLE, _low_order_peer),
    ],
)
def test_each_handshake_rejection_counts_its_own_reason(
    reason: Reason, reject: Callable[[Pair], WireGuardCore]
) -> None:
    core = reject(Pair())
    counted = {k: n for k, n in core.dropped.items() if k in HANDSHAKE_REASONS}
    assert counted == {reason.value: 1}


def test_every_timer_has_a_handler() -> None:
    p = Pair()
    p.handshake()
    peer = p.peer_of(p.a)
    for timer in Timer:
        setattr(peer.timers, timer.value, p.now)
        p.a.core.on_timer(p.now)  # a timer without a handler would raise KeyError
        deadline = peer.timers.deadline(timer)
        assert deadline is None or deadline > p.now
