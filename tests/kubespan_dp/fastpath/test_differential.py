"""C against the Python core, no root needed: the constants compiled into C, the C
allowed-IPs trie against allowedips.py, the C replay window against replay.py
(Hypothesis drives both sides with the same operations)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from kubespan_dp import crypto, messages, padding, replay, timers
from kubespan_dp.allowedips import AllowedIPs


def test_c_and_python_constants_agree() -> None:
    """C reads the protocol constants from _wg_constants.h, which setup.py generates
    from kubespan_dp/constants.py, the module the Python core imports: this guards
    the generator (and a stale header), C must see what Python sees."""
    c = bt.constants()
    python = {
        "REJECT_AFTER_MESSAGES": timers.REJECT_AFTER_MESSAGES,
        "REKEY_AFTER_MESSAGES": timers.REKEY_AFTER_MESSAGES,
        "REKEY_AFTER_TIME": timers.REKEY_AFTER_TIME,
        "REJECT_AFTER_TIME": timers.REJECT_AFTER_TIME,
        "KEEPALIVE_TIMEOUT": timers.KEEPALIVE_TIMEOUT,
        "REKEY_TIMEOUT": timers.REKEY_TIMEOUT,
        "RING_BLOCKS": replay.RING_BLOCKS,
        "WINDOW_SIZE": replay.WINDOW_SIZE,
        "TRANSPORT_HEADER_SIZE": messages.TRANSPORT_HEADER_SIZE,
        "TRANSPORT_MIN_SIZE": messages.TRANSPORT_MIN_SIZE,
        "INITIATION_SIZE": messages.INITIATION_SIZE,
        "RESPONSE_SIZE": messages.RESPONSE_SIZE,
        "COOKIE_REPLY_SIZE": messages.COOKIE_REPLY_SIZE,
        "TAG_SIZE": crypto.TAG_LEN,
        "TRANSPORT": messages.TRANSPORT,
        "PADDING_MULTIPLE": padding.PADDING_MULTIPLE,
    }
    assert c == python
    assert replay.REJECT_AFTER_MESSAGES == timers.REJECT_AFTER_MESSAGES


# ------------------------------------------------------------------ replay window

counters = st.one_of(
    st.integers(0, 20_000),
    st.integers(timers.REJECT_AFTER_MESSAGES - 10_000, timers.REJECT_AFTER_MESSAGES + 5),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), counters), max_size=300))
def test_c_replay_window_matches_replay_py(ops: list[tuple[bool, int]]) -> None:
    c = fp.Keypair(bytes(32), bytes(32), 1, 2)
    py = replay.ReplayWindow()
    for update, counter in ops:
        if update:
            assert bt.replay_update(c, counter) == py.update(counter), counter
        else:
            assert bt.replay_check(c, counter) == py.check(counter), counter


# ------------------------------------------------------------------ allowed IPs


@pytest.fixture(scope="module")
def loop() -> Iterator[fp.PacketLoop]:
    yield fp.PacketLoop(-1, -1, -1, 1420, max_peers=16)


def _packet(addr: bytes) -> bytes:
    if len(addr) == 4:
        return bytes([0x45]) + bytes(11) + bytes(4) + addr
    return bytes([0x60]) + bytes(23) + addr + bytes(0)


prefix4 = st.tuples(st.binary(min_size=4, max_size=4), st.integers(0, 32))
prefix6 = st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 128))
# addresses near each other so prefixes overlap often
near4 = st.builds(lambda b, n: bytes([10, 0]) + b, st.binary(min_size=2, max_size=2), st.just(0))
entries = st.lists(
    st.tuples(st.one_of(prefix4, prefix6, st.tuples(near4, st.integers(8, 32))), st.integers(0, 7)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    entries,
    st.lists(
        st.one_of(st.binary(min_size=4, max_size=4), near4, st.binary(min_size=16, max_size=16)),
        max_size=30,
    ),
)
def test_c_trie_matches_allowedips_py(
    loop: fp.PacketLoop, table: list[tuple[tuple[bytes, int], int]], probes: list[bytes]
) -> None:
    py = AllowedIPs()
    peers = [object() for _ in range(8)]
    c_entries = []
    for (addr, plen), pid in table:
        net = ipaddress.ip_network((addr, plen), strict=False)
        py.insert(net, peers[pid])
        c_entries.append((net.network_address.packed, plen, pid))
    loop.set_allowed_ips(c_entries)
    for addr in probes + [a for (a, _), _ in table]:
        want = py.lookup(addr)
        got = loop.route(_packet(addr))
        assert got == (peers.index(want) if want is not None else -1), (addr.hex(), table)
