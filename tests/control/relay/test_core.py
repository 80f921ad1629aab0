"""control.relay.core: registration, routing by mac1 and index, limits, every drop reason."""

from __future__ import annotations

import os
import struct

import pytest

from control.relay import core, registration
from control.relay.core import Limits, RelayCore
from kubespan_dp import crypto
from kubespan_dp.noise import LABEL_MAC1

KEY = registration.registration_key("cluster-1", bytes(range(32)))
NOW = 1_800_000_000.0
A = ("198.51.100.1", 40001)  # node A's NAT mapping toward the relay
B = ("203.0.113.7", 51234)  # node B's
EVIL = ("192.0.2.66", 666)
PUB_A, PUB_B = os.urandom(32), os.urandom(32)


def reg(public_key: bytes, at: float, key: bytes = KEY) -> bytes:
    return registration.encode(key, public_key, int(at * 1e9))


def initiation(to_public: bytes, sender: int) -> bytes:
    body = struct.pack("<II", 1, sender) + os.urandom(108)
    mac1 = crypto.mac(crypto.hash_(LABEL_MAC1, to_public), body)
    return body + mac1 + bytes(16)


def response(sender: int, receiver: int) -> bytes:
    return struct.pack("<III", 2, sender, receiver) + os.urandom(80)


def cookie_reply(receiver: int) -> bytes:
    return struct.pack("<II", 3, receiver) + os.urandom(56)


def data(receiver: int, size: int = 64) -> bytes:
    return struct.pack("<IIQ", 4, receiver, 0) + os.urandom(size - 16)


@pytest.fixture
def relay() -> RelayCore:
    r = RelayCore(KEY)
    assert r.receive(reg(PUB_A, NOW), A, NOW) is None  # registrations are never answered
    assert r.receive(reg(PUB_B, NOW), B, NOW) is None
    assert r.nodes() == {PUB_A: A, PUB_B: B}
    return r


def handshake(r: RelayCore, i: int = 11, j: int = 22, now: float = NOW) -> None:
    """A initiates to B through the relay: sender indices i (A) and j (B)."""
    assert r.receive(initiation(PUB_B, i), A, now) == B
    assert r.receive(response(j, i), B, now) == A


def test_registration_size_and_type() -> None:
    msg = reg(PUB_A, NOW)
    assert len(msg) == registration.SIZE == 60
    # As WireGuard reads it (u32 little endian), not one of its types 1-4.
    assert struct.unpack_from("<I", msg)[0] not in (1, 2, 3, 4)
    assert registration.decode(KEY, msg) == (PUB_A, int(NOW * 1e9))
    other = registration.registration_key("cluster-2", bytes(range(32)))
    assert registration.decode(other, msg) is None  # bound to the cluster id too


def test_initiation_routed_by_mac1(relay: RelayCore) -> None:
    assert relay.receive(initiation(PUB_B, 1), A, NOW) == B
    assert relay.receive(initiation(PUB_A, 2), B, NOW) == A
    assert relay.receive(initiation(os.urandom(32), 3), A, NOW) is None
    assert relay.dropped == {core.UNKNOWN_RECIPIENT: 1}
    assert relay.forwarded["initiation"] == 2


def test_full_exchange_both_ways(relay: RelayCore) -> None:
    handshake(relay, i=11, j=22)
    assert relay.receive(data(22), A, NOW) == B  # A -> B uses B's index
    assert relay.receive(data(11), B, NOW) == A
    assert relay.receive(data(11, 32), B, NOW) == A  # keepalive
    assert relay.forwarded == {"initiation": 1, "response": 1, "data": 3}
    assert not relay.dropped


def test_response_only_from_the_responder(relay: RelayCore) -> None:
    assert relay.receive(initiation(PUB_B, 11), A, NOW) == B
    assert relay.receive(response(22, 11), EVIL, NOW) is None
    assert relay.dropped == {core.WRONG_SOURCE: 1}
    assert relay.receive(response(22, 99), B, NOW) is None  # no such handshake
    assert relay.dropped[core.UNKNOWN_INDEX] == 1
    assert relay.receive(response(22, 11), B, NOW) == A  # the real one still works


def test_spoofed_index_dropped(relay: RelayCore) -> None:
    handshake(relay)
    assert relay.receive(data(22), EVIL, NOW) is None
    assert relay.receive(data(11), A, NOW) is None  # A sending to itself: not its peer's index
    assert relay.receive(data(33), A, NOW) is None
    assert relay.dropped == {core.WRONG_SOURCE: 2, core.UNKNOWN_INDEX: 1}


def test_cookie_reply_routes(relay: RelayCore) -> None:
    # Under load B answers A's initiation with a cookie reply to A's index.
    assert relay.receive(initiation(PUB_B, 11), A, NOW) == B
    assert relay.receive(cookie_reply(11), B, NOW) == A
    assert relay.receive(cookie_reply(11), EVIL, NOW) is None
    assert relay.receive(response(22, 11), B, NOW) == A
    # ... and A answers B's response with one to B's index.
    assert relay.receive(cookie_reply(22), A, NOW) == B
    assert relay.receive(cookie_reply(77), A, NOW) is None
    assert relay.dropped == {core.WRONG_SOURCE: 1, core.UNKNOWN_INDEX: 1}


def test_registration_needs_the_cluster_key(relay: RelayCore) -> None:
    wrong = registration.registration_key("cluster-1", bytes(32))
    assert relay.receive(reg(PUB_A, NOW + 1, wrong), EVIL, NOW) is None
    tampered = bytearray(reg(PUB_A, NOW + 1))
    tampered[10] ^= 1
    assert relay.receive(bytes(tampered), EVIL, NOW) is None
    assert relay.dropped == {core.BAD_REGISTRATION: 2}
    assert relay.nodes()[PUB_A] == A


def test_registration_replay_and_window(relay: RelayCore) -> None:
    first = reg(PUB_A, NOW + 1)
    assert relay.receive(first, A, NOW + 1) is None
    assert relay.receive(first, EVIL, NOW + 2) is None  # replayed from elsewhere
    assert relay.receive(reg(PUB_A, NOW + 0.5), EVIL, NOW + 2) is None  # older
    assert relay.receive(reg(PUB_A, NOW + 200), EVIL, NOW + 2) is None  # from the future
    assert relay.receive(reg(os.urandom(32), NOW - 100), EVIL, NOW) is None  # too old
    assert relay.dropped == {core.STALE_REGISTRATION: 4}
    assert relay.nodes()[PUB_A] == A
    # A newer one moves the node (its NAT mapping changed).
    moved = ("198.51.100.1", 40999)
    assert relay.receive(reg(PUB_A, NOW + 3), moved, NOW + 3) is None
    assert relay.nodes()[PUB_A] == moved
    assert relay.receive(initiation(PUB_A, 5), B, NOW + 3) == moved


def test_expiry(relay: RelayCore) -> None:
    handshake(relay)
    assert relay.receive(initiation(PUB_B, 44), A, NOW) == B  # left pending
    later = NOW + core.PENDING_TTL + 1
    assert relay.receive(response(55, 44), B, later) is None  # pending expired
    assert relay.receive(data(22), A, later) == B  # the session lives on
    end = NOW + core.SESSION_TTL + 1
    assert relay.receive(data(22), A, end) is None  # sessions end with their keypairs
    relay.receive(reg(PUB_A, end), A, end)  # A keeps registering, B stopped
    assert relay.receive(initiation(PUB_B, 66), A, end) is None
    relay.expire(end)
    assert relay.table_sizes()["nodes"] == 1
    assert relay.table_sizes()["pending"] == relay.table_sizes()["sessions"] == 0
    assert relay.dropped == {core.UNKNOWN_INDEX: 2, core.UNKNOWN_RECIPIENT: 1}


def test_malformed() -> None:
    r = RelayCore(KEY)
    for junk in (
        b"",
        b"\x04\x00\x00\x00",  # data shorter than a keepalive
        bytes(64),  # type 0
        struct.pack("<I", 1) + bytes(100),  # initiation of the wrong size
        struct.pack("<I", 2) + bytes(148),  # response of the wrong size
        struct.pack("<I", 0x104) + bytes(144),  # reserved bytes set: not type 4
        b"KSR\x01" + bytes(40),  # a registration of the wrong size
    ):
        assert r.receive(junk, EVIL, NOW) is None
    assert r.dropped == {core.MALFORMED: 6, core.BAD_REGISTRATION: 1}
    assert not r.forwarded


def test_loop(relay: RelayCore) -> None:
    assert relay.receive(initiation(PUB_A, 1), A, NOW) is None
    assert relay.dropped == {core.LOOP: 1}


def test_handshake_rate_per_source() -> None:
    r = RelayCore(KEY, Limits(handshake_rate=10, handshake_burst=5))
    r.receive(reg(PUB_B, NOW), B, NOW)
    sent = [r.receive(initiation(PUB_B, n), A, NOW) for n in range(20)]
    assert sent.count(B) == 5  # the burst
    assert r.dropped == {core.RATE_LIMITED: 15}
    # Another source has its own bucket; time refills A's.
    assert r.receive(initiation(PUB_B, 100), EVIL, NOW) == B
    assert r.receive(initiation(PUB_B, 101), A, NOW + 0.2) == B


def test_data_rate_per_source() -> None:
    r = RelayCore(KEY, Limits(data_rate=100, data_burst=10))
    r.receive(reg(PUB_A, NOW), A, NOW)
    r.receive(reg(PUB_B, NOW), B, NOW)
    handshake(r)
    out = [r.receive(data(22), A, NOW) for _ in range(30)]
    assert out.count(B) == 10
    assert r.receive(data(11), B, NOW) == A  # B's own bucket
    assert r.dropped == {core.RATE_LIMITED: 20}


def test_tables_bounded_without_evicting() -> None:
    r = RelayCore(KEY, Limits(max_nodes=2, max_pending=3, max_sessions=4, handshake_burst=1000))
    r.receive(reg(PUB_A, NOW), A, NOW)
    r.receive(reg(PUB_B, NOW), B, NOW)
    assert r.receive(reg(os.urandom(32), NOW), EVIL, NOW) is None
    assert r.nodes() == {PUB_A: A, PUB_B: B}
    assert [r.receive(initiation(PUB_B, n), A, NOW) for n in range(5)] == [B, B, B, None, None]
    assert r.receive(response(100, 0), B, NOW) == A
    assert r.receive(response(101, 1), B, NOW) == A
    assert r.receive(response(102, 2), B, NOW) is None  # 4 sessions already
    assert r.receive(data(100), A, NOW) == B  # the first ones keep working
    assert r.dropped == {core.TABLE_FULL: 4}
    sizes = r.table_sizes()
    assert (sizes["nodes"], sizes["pending"], sizes["sessions"]) == (2, 1, 4)


def test_flood_of_sources_is_bounded() -> None:
    r = RelayCore(KEY, Limits(max_sources=100))
    for n in range(1000):
        r.receive(initiation(PUB_B, n), (f"10.0.{n // 250}.{n % 250}", 1000 + n), NOW)
    assert r.table_sizes()["sources"] <= 200
    assert r.dropped[core.UNKNOWN_RECIPIENT] + r.dropped[core.RATE_LIMITED] == 1000
