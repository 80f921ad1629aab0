"""Property tests: hostile datagrams never raise, never change state, are always counted."""

from __future__ import annotations

import copy
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubespan_dp import messages
from kubespan_dp.core import WireGuardCore
from tests.kubespan_dp.wgpair import Pair, ipv4_packet

A_IP, B_IP = "192.168.0.1", "192.168.0.2"


def _established() -> tuple[Pair, dict[str, bytes]]:
    """A pair with a session, and one genuine datagram of each kind seen on the wire."""
    p = Pair(seed=7)
    p.b.core.under_load = False
    p.handshake()
    p.send(p.a, ipv4_packet(A_IP, B_IP, b"data" * 10))
    p.deliver()
    p.run_until(11)  # a keepalive from b
    samples: dict[str, bytes] = {}
    for node in (p.a, p.b):
        for _, d, _ in node.sent:
            kind = messages.message_type(d)
            name = {
                1: "initiation",
                2: "response",
                3: "cookie",
                4: "keepalive" if len(d) == 32 else "data",
            }[kind]
            samples.setdefault(name, d)
    # A cookie reply to a's initiation, made by b's checker.
    init = samples["initiation"]
    samples["cookie"] = p.b.core.cookie_checker.create_reply(init, 1, p.a.addr, p.now)
    return p, samples


PAIR, SAMPLES = _established()


def snapshot(core: WireGuardCore) -> object:
    """Everything a datagram could disturb, as plain comparable values."""
    peers = []
    for peer in core.peers.values():
        hs = dataclasses.asdict(peer.handshake)
        timers = {
            f.name: getattr(peer.timers, f.name)
            for f in dataclasses.fields(peer.timers)
            if f.name != "jitter"
        }
        kps = [
            (
                k.local_index,
                k.remote_index,
                k.send_counter,
                k.created,
                k.replay.last,
                tuple(k.replay._ring),
            )
            for k in peer.keypairs.all()
        ]
        slots = tuple(
            id(k) if k else None
            for k in (peer.keypairs.current, peer.keypairs.previous, peer.keypairs.next)
        )
        gen = peer.cookie_generator
        peers.append(
            (
                peer.public_key,
                peer.endpoint,
                peer.rx_bytes,
                peer.tx_bytes,
                peer.last_handshake,
                hs,
                timers,
                kps,
                slots,
                list(peer.staged),
                gen.cookie,
                gen.cookie_set,
                gen.last_mac1,
                peer.allowed_ips,
            )
        )
    checker = core.cookie_checker
    return (
        peers,
        sorted(core.index_table.entries),
        checker._secret,
        checker._secret_set,
        copy.deepcopy(core.rate_limiter.table),
    )


def _mutate(data: bytes, how: str, pos: int, extra: bytes) -> bytes:
    if how == "flip":
        i = pos % (len(data) * 8)
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        return bytes(b)
    if how == "truncate":
        return data[: pos % len(data)]
    return data + (extra or b"\x00")


mutated = st.builds(
    _mutate,
    st.sampled_from(sorted(SAMPLES.values())),
    st.sampled_from(["flip", "truncate", "extend"]),
    st.integers(min_value=0, max_value=10_000),
    st.binary(max_size=64),
)

random_datagrams = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda kind, rest: kind + rest,
        st.sampled_from([b"\x01\0\0\0", b"\x02\0\0\0", b"\x03\0\0\0", b"\x04\0\0\0"]),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda kind, n, rest: (kind + rest + bytes(n))[:n],
        st.sampled_from([b"\x01\0\0\0", b"\x02\0\0\0", b"\x03\0\0\0", b"\x04\0\0\0"]),
        st.sampled_from([32, 64, 92, 148]),
        st.binary(max_size=148),
    ),
)

sources = st.sampled_from([("10.0.0.1", 51820), ("10.7.7.7", 9), ("fd00::99", 51820)])


def _check_inert(datagram: bytes, source: tuple[str, int], core: WireGuardCore) -> None:
    before = snapshot(core)
    drops = sum(core.dropped.values())
    out = core.receive_datagram(datagram, source, PAIR.now)
    assert not out.datagrams and not out.packets and not out.events
    assert snapshot(core) == before
    assert sum(core.dropped.values()) == drops + 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated, sources)
def test_mutated_datagrams_are_inert(datagram: bytes, source: tuple[str, int]) -> None:
    for node in (PAIR.a, PAIR.b):
        _check_inert(datagram, source, node.core)


@settings(max_examples=300, deadline=None)
@given(random_datagrams, sources)
def test_random_datagrams_are_inert(datagram: bytes, source: tuple[str, int]) -> None:
    for node in (PAIR.a, PAIR.b):
        _check_inert(datagram, source, node.core)


def test_session_still_works_after_fuzzing() -> None:
    n = len(PAIR.b.inbox)
    PAIR.send(PAIR.a, ipv4_packet(A_IP, B_IP, b"still alive"))
    PAIR.deliver()
    assert len(PAIR.b.inbox) == n + 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1600))
def test_random_tun_packets_never_raise(packet: bytes) -> None:
    p = PAIR
    drops = sum(p.a.core.dropped.values())
    out = p.a.core.send_packet(packet, p.now)
    if out.datagrams:
        assert all(messages.message_type(d) in (1, 4) for d, _ in out.datagrams)
    else:
        assert sum(p.a.core.dropped.values()) == drops + 1
