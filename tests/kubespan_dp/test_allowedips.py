"""Allowed-IPs trie: unit cases and a Hypothesis comparison with naive LPM."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan_dp.allowedips import AllowedIPs, _Node


@dataclass
class FakePeer:
    """Unhashable (dataclass eq) on purpose: the table must use identity."""

    name: str


A, B, C = FakePeer("a"), FakePeer("b"), FakePeer("c")


def v4_packet(src: str, dst: str) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28,
        0,
        0,
        64,
        17,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    ) + bytes(8)


def v6_packet(src: str, dst: str) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, 8, 17, 64, IPv6Address(src).packed, IPv6Address(dst).packed
    ) + bytes(8)


def table(*routes: tuple[str, FakePeer]) -> AllowedIPs:
    t = AllowedIPs()
    for net, peer in routes:
        t.insert(ip_network(net), peer)
    return t


def assert_lookups(t: AllowedIPs, expected: dict[str, FakePeer | None]) -> None:
    """Each address resolves to exactly that peer object (identity, not equality)."""
    got = {address: t.lookup(ip_address(address)) for address in expected}
    assert all(got[a] is peer for a, peer in expected.items()), got


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [("10.0.0.0/8", A), ("10.1.0.0/16", B), ("10.1.2.3/32", C)],
            {"10.200.0.1": A, "10.1.9.9": B, "10.1.2.3": C, "10.1.2.4": B, "11.0.0.1": None},
            id="longest-prefix-wins",
        ),
        pytest.param(
            [("0.0.0.0/0", A)],
            {"1.2.3.4": A, "::1": None},
            id="families-are-separate",
        ),
        pytest.param(
            [("0.0.0.0/0", A), ("::/0", B), ("fd00::/8", C)],
            {"2001:db8::1": B, "fd7f:175a:b97c:5602::1": C, "255.255.255.255": A},
            id="default-routes",
        ),
    ],
)
def test_lookup(routes: list[tuple[str, FakePeer]], expected: dict[str, FakePeer | None]) -> None:
    assert_lookups(table(*routes), expected)


def test_raw_bytes_lookup() -> None:
    t = AllowedIPs()
    t.insert(ip_network("192.168.0.0/24"), A)
    t.insert(ip_network("fd00::/64"), B)
    assert t.lookup(bytes([192, 168, 0, 7])) is A
    assert t.lookup(IPv6Address("fd00::5").packed) is B
    assert t.lookup(bytes(4)) is None
    with pytest.raises(ValueError):
        t.lookup(bytes(5))


def test_reinsert_moves_prefix_to_new_peer() -> None:
    t = table(("10.0.0.0/24", A))
    net = ip_network("10.0.0.0/24")
    t.insert(net, B)
    assert t.lookup(ip_address("10.0.0.1")) is B
    assert t.entries_for(A) == []
    assert t.entries_for(B) == [net]


def test_remove_only_if_owned() -> None:
    t = table(("10.0.0.0/24", A))
    net = ip_network("10.0.0.0/24")
    t.remove(net, B)
    assert t.lookup(ip_address("10.0.0.1")) is A
    t.remove(ip_network("10.0.0.0/25"), A)  # not an entry: nothing happens
    assert t.lookup(ip_address("10.0.0.1")) is A
    t.remove(net, A)
    assert t.lookup(ip_address("10.0.0.1")) is None
    assert t.entries_for(A) == []


def test_identity_not_equality() -> None:
    t = AllowedIPs()
    twin = FakePeer("a")
    assert twin == A
    t.insert(ip_network("10.0.0.0/8"), A)
    t.remove(ip_network("10.0.0.0/8"), twin)
    assert t.lookup(ip_address("10.0.0.1")) is A
    assert t.entries_for(twin) == []


def test_remove_peer_keeps_others() -> None:
    t = table(("10.0.0.0/8", A), ("10.1.0.0/16", B), ("10.1.1.0/24", A), ("fd00::/16", A))
    t.remove_peer(A)
    assert t.entries_for(A) == []
    assert_lookups(t, {"10.1.1.1": B, "10.2.0.0": None, "fd00::1": None})
    t.remove_peer(A)  # no entries left: harmless


def test_non_canonical_networks_are_masked() -> None:
    t = AllowedIPs()
    t.insert(ip_network("10.1.2.3/16", strict=False), A)
    t.insert("192.168.7.9/24", B)  # type: ignore[arg-type]
    t.insert(IPv4Interface("172.16.5.5/12"), C)  # type: ignore[arg-type]
    t.insert("fd00::1234/64", C)  # type: ignore[arg-type]
    assert t.entries_for(A) == [IPv4Network("10.1.0.0/16")]
    assert t.entries_for(B) == [IPv4Network("192.168.7.0/24")]
    assert t.entries_for(C) == [IPv4Network("172.16.0.0/12"), IPv6Network("fd00::/64")]
    assert t.lookup(ip_address("10.1.200.1")) is A
    t.remove("10.1.99.99/16", A)  # type: ignore[arg-type]
    assert t.lookup(ip_address("10.1.200.1")) is None


def test_entries_for_order() -> None:
    t = AllowedIPs()
    nets = [ip_network(n) for n in ("10.0.0.0/8", "fd00::/8", "10.1.0.0/16", "192.168.1.1/32")]
    for net in nets:
        t.insert(net, A)
    assert t.entries_for(A) == nets
    t.insert(nets[0], A)  # re-assigning moves it to the end
    assert t.entries_for(A) == nets[1:] + nets[:1]


def test_clear() -> None:
    t = table(("10.0.0.0/8", A), ("::/0", B))
    t.clear()
    assert_lookups(t, {"10.0.0.1": None, "::1": None})
    assert t.entries_for(A) == [] and t.entries_for(B) == []


def test_packet_lookups() -> None:
    t = table(("10.0.0.0/24", A), ("10.0.1.0/24", B), ("fd00:1::/64", A), ("fd00:2::/64", B))
    p4 = v4_packet("10.0.0.5", "10.0.1.9")
    assert t.lookup_packet_source(p4) is A
    assert t.lookup_packet_destination(p4) is B
    p6 = v6_packet("fd00:2::1", "fd00:1::1")
    assert t.lookup_packet_source(p6) is B
    assert t.lookup_packet_destination(p6) is A


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        v4_packet("10.0.0.5", "10.0.1.9")[:19],
        v6_packet("fd00:2::1", "fd00:1::1")[:39],
        b"\x50" + bytes(60),  # version 5
        bytes(60),  # version 0
    ],
)
def test_malformed_packets(packet: bytes) -> None:
    t = table(("0.0.0.0/0", A), ("::/0", A))
    assert t.lookup_packet_source(packet) is None
    assert t.lookup_packet_destination(packet) is None


# -- property test against a naive table --------------------------------------


def check_structure(t: AllowedIPs) -> int:
    """Trie invariants; returns the number of nodes holding a peer."""
    held = 0
    for version, width in ((4, 32), (6, 128)):
        root = t._roots[version]
        if root is not None:
            assert root.parent is None
        stack: list[_Node] = [root] if root else []
        while stack:
            node = stack.pop()
            assert node.shift + node.cidr == width
            if node.peer is None:
                assert all(c is not None for c in node.children), "useless branch node"
            else:
                held += 1
            for bit, child in enumerate(node.children):
                if child is None:
                    continue
                assert child.parent is node
                assert child.cidr > node.cidr
                assert child.key >> node.shift == node.prefix  # inside the parent
                assert (child.key >> (node.shift - 1)) & 1 == bit
                stack.append(child)
    return held


class NaiveTable:
    def __init__(self) -> None:
        self.routes: dict[tuple[int, int, int], FakePeer] = {}  # (version, key, cidr)
        self.order: dict[int, list[tuple[int, int, int]]] = {}

    def insert(self, entry: tuple[int, int, int], peer: FakePeer) -> None:
        old = self.routes.get(entry)
        if old is not None:
            self.order[id(old)].remove(entry)
        self.routes[entry] = peer
        self.order.setdefault(id(peer), []).append(entry)

    def remove(self, entry: tuple[int, int, int], peer: FakePeer) -> None:
        if self.routes.get(entry) is peer:
            del self.routes[entry]
            self.order[id(peer)].remove(entry)

    def remove_peer(self, peer: FakePeer) -> None:
        for entry in self.order.pop(id(peer), []):
            del self.routes[entry]

    def lookup(self, version: int, address: int) -> FakePeer | None:
        width = 32 if version == 4 else 128
        best, best_cidr = None, -1
        for (v, key, cidr), peer in self.routes.items():
            if v == version and address >> (width - cidr) == key >> (width - cidr):
                if cidr > best_cidr:
                    best, best_cidr = peer, cidr
        return best


PEERS = [FakePeer(f"p{i}") for i in range(4)]


def clustered_int(width: int) -> st.SearchStrategy[int]:
    # A few flipped bits over a shared base: prefixes overlap and nest often.
    return st.sets(st.integers(0, width - 1), max_size=4).map(
        lambda bits: sum(1 << b for b in bits)
    )


def prefix(version: int) -> st.SearchStrategy[tuple[int, int, int]]:
    width = 32 if version == 4 else 128
    return st.tuples(clustered_int(width), st.integers(0, width)).map(
        lambda kc: (version, kc[0] & ~((1 << (width - kc[1])) - 1), kc[1])
    )


prefixes = st.one_of(prefix(4), prefix(6))
peers = st.sampled_from(PEERS)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), prefixes, peers),
        st.tuples(st.just("insert"), prefixes, peers),
        st.tuples(st.just("remove"), prefixes, peers),
        st.tuples(st.just("remove_existing"), st.integers(0, 10**6), st.just(None)),
        st.tuples(st.just("remove_peer"), st.just(None), peers),
    ),
    max_size=60,
)
probes = st.lists(
    st.one_of(
        st.tuples(st.just(4), clustered_int(32)),
        st.tuples(st.just(6), clustered_int(128)),
    ),
    max_size=30,
)


def to_network(entry: tuple[int, int, int]) -> IPv4Network | IPv6Network:
    version, key, cidr = entry
    return IPv4Network((key, cidr)) if version == 4 else IPv6Network((key, cidr))


@settings(max_examples=400, deadline=None)
@given(operations, probes)
def test_matches_naive_lpm(
    ops: list[tuple[str, object, object]], extra: list[tuple[int, int]]
) -> None:
    t, model = AllowedIPs(), NaiveTable()
    for op, arg, peer in ops:
        if op == "insert":
            t.insert(to_network(arg), peer)  # type: ignore[arg-type]
            model.insert(arg, peer)  # type: ignore[arg-type]
        elif op == "remove":
            t.remove(to_network(arg), peer)  # type: ignore[arg-type]
            model.remove(arg, peer)  # type: ignore[arg-type]
        elif op == "remove_existing" and model.routes:
            entries = list(model.routes)
            entry = entries[arg % len(entries)]  # type: ignore[operator]
            owner = model.routes[entry]
            t.remove(to_network(entry), owner)
            model.remove(entry, owner)
        elif op == "remove_peer":
            t.remove_peer(peer)
            model.remove_peer(peer)  # type: ignore[arg-type]
        assert check_structure(t) == len(model.routes)

    for peer in PEERS:
        assert t.entries_for(peer) == [to_network(e) for e in model.order.get(id(peer), [])]

    # Probe random addresses and the first and last address of every prefix.
    points = list(extra)
    for version, key, cidr in model.routes:
        width = 32 if version == 4 else 128
        points += [(version, key), (version, key | ((1 << (width - cidr)) - 1))]
    for version, address in points:
        expected = model.lookup(version, address)
        raw = address.to_bytes(4 if version == 4 else 16, "big")
        assert t.lookup(raw) is expected
        assert t.lookup(ip_address(raw)) is expected
        packet = (
            v4_packet("0.0.0.0", str(IPv4Address(raw)))
            if version == 4
            else v6_packet("::", str(IPv6Address(raw)))
        )
        assert t.lookup_packet_destination(packet) is expected


def test_insert_at_existing_branch_point() -> None:
    # 10.64.0.0/10 and 10.128.0.0/9 part ways at 10.0.0.0/8,
    # so a peerless branch node sits there; inserting /8 must turn it into an entry.
    t = AllowedIPs()
    t.insert(ip_network("10.64.0.0/10"), A)
    t.insert(ip_network("10.128.0.0/9"), B)
    t.insert(ip_network("10.0.0.0/8"), C)
    assert check_structure(t) == 3
    assert t.lookup(ip_address("10.1.0.0")) is C
    assert t.lookup(ip_address("10.65.0.0")) is A
    assert t.entries_for(C) == [ip_network("10.0.0.0/8")]
    t.remove(ip_network("10.0.0.0/8"), C)
    assert check_structure(t) == 2
    assert t.lookup(ip_address("10.1.0.0")) is None
