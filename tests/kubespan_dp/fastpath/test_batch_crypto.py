"""The C batch crypto against the pure-Python core's crypto, padding and replay window.

Differential: for the same keys and counters, ``_batch.seal_batch`` must produce the
exact bytes a pure-Python sealer produces (header | AEAD(padded plaintext)), and each
side must open the other's messages.  Tampered or replayed messages are rejected
without disturbing the session.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from kubespan_dp.crypto import AEAD, AuthenticationError
from kubespan_dp.padding import pad_plaintext
from kubespan_dp.replay import ReplayWindow
from tests.kubespan_dp.replaymodel import REJECT_AFTER_MESSAGES, WINDOW, ReplayModel

MTU = 1420


def _padded(n: int, mtu: int = MTU) -> int:
    return len(pad_plaintext(bytes(n), mtu))


# The pure-Python core's pieces (kubespan_dp.crypto / padding) are the reference.
def reference_seal(key: bytes, remote_index: int, counter: int, packet: bytes) -> bytes:
    header = struct.pack("<IIQ", 4, remote_index, counter)
    return header + AEAD(key).seal(counter, pad_plaintext(packet, MTU))


def reference_open(key: bytes, message: bytes) -> tuple[int, int, bytes]:
    kind, index, counter = struct.unpack_from("<IIQ", message)
    assert kind == 4
    return index, counter, AEAD(key).open(counter, message[16:])


def _pair(send_counter: int = 0) -> tuple[fp.Keypair, fp.Keypair, bytes, bytes]:
    """Two ends of one session: a sends with k1 to b (index 0xB0B), b with k2 to a."""
    k1, k2 = os.urandom(32), os.urandom(32)
    a = fp.Keypair(k1, k2, 0xA11CE, 0xB0B, is_initiator=True, send_counter=send_counter)
    b = fp.Keypair(k2, k1, 0xB0B, 0xA11CE)
    return a, b, k1, k2


SIZES = [0, 1, 15, 16, 17, 40, 64, 576, 1279, 1280, 1404, 1405, 1419, 1420]


def test_seal_batch_matches_reference_byte_for_byte() -> None:
    a, _, k1, _ = _pair(send_counter=1000)
    batch = bt.PacketBatch(64)
    packets = [os.urandom(n) for n in SIZES]
    for p in packets:
        batch.add_plaintext(p)
    assert bt.seal_batch(a, batch, MTU) == len(packets)
    assert batch.statuses() == [bt.STATUS_OK] * len(packets)
    for i, p in enumerate(packets):
        assert batch.get(i) == reference_seal(k1, 0xB0B, 1000 + i, p)
    assert a.send_counter == 1000 + len(packets)


def test_keepalive_is_exactly_32_bytes_and_padding_caps_at_mtu() -> None:
    a, _, _, _ = _pair()
    batch = bt.PacketBatch(4)
    batch.add_plaintext(b"")
    batch.add_plaintext(b"x" * 1419)
    batch.add_plaintext(b"x" * 1413)
    bt.seal_batch(a, batch, MTU)
    assert [len(m) for m in batch.packets()] == [32, 1420 + 32, 1420 + 32]


def test_each_opens_the_others_messages() -> None:
    a, b, k1, k2 = _pair()
    packets = [os.urandom(n) for n in SIZES]
    # ours -> reference
    batch = bt.PacketBatch(64)
    for p in packets:
        batch.add_plaintext(p)
    bt.seal_batch(a, batch, MTU)
    for i, p in enumerate(packets):
        index, counter, plain = reference_open(k1, batch.get(i))
        assert (index, counter) == (0xB0B, i)
        assert plain[: len(p)] == p and plain[len(p) :] == b"\x00" * (len(plain) - len(p))
    # reference -> ours
    inbound = bt.PacketBatch(64)
    for i, p in enumerate(packets):
        inbound.add_message(reference_seal(k2, 0xA11CE, 7 + 3 * i, p))
    assert bt.open_batch(a, inbound) == len(packets)
    for i, p in enumerate(packets):
        assert inbound.get(i) == p + b"\x00" * (_padded(len(p)) - len(p))
    # ours -> ours
    batch.clear()
    for p in packets:
        batch.add_plaintext(p)
    bt.seal_batch(a, batch, MTU)
    assert bt.open_batch(b, batch) == len(packets)
    assert [m[: len(p)] for m, p in zip(batch.packets(), packets, strict=True)] == packets


def _tampered(message: bytes) -> list[tuple[bytes, set[int]]]:
    out: list[tuple[bytes, set[int]]] = []
    flip = lambda m, i: m[:i] + bytes([m[i] ^ 0x01]) + m[i + 1 :]  # noqa: E731
    out.append((flip(message, 0), {bt.STATUS_MALFORMED}))
    out.append((flip(message, 4), {bt.STATUS_WRONG_INDEX}))
    out.append((flip(message, 8), {bt.STATUS_BAD_TAG}))  # counter: other nonce
    out.append((flip(message, 16), {bt.STATUS_BAD_TAG}))  # ciphertext
    out.append((flip(message, len(message) - 1), {bt.STATUS_BAD_TAG}))  # tag
    out.append((message[:-1], {bt.STATUS_BAD_TAG}))
    out.append((message + b"\x00", {bt.STATUS_BAD_TAG}))
    out.append((message[:31], {bt.STATUS_MALFORMED}))
    out.append((b"", {bt.STATUS_MALFORMED}))
    return out


def test_tampered_messages_rejected_and_session_undisturbed() -> None:
    a, b, k1, _ = _pair()
    good = reference_seal(k1, 0xB0B, 5, b"hello world" * 10)
    bad = bt.PacketBatch(16)
    expected = []
    for m, statuses in _tampered(good):
        bad.add_message(m)
        expected.append(statuses)
    assert bt.open_batch(b, bad) == 0
    for i, allowed in enumerate(expected):
        assert bad.status_of(i) in allowed, (i, bad.status_of(i))
    assert b.rx_packets == 0
    # The genuine message with the same counter still opens: nothing was recorded.
    ok = bt.PacketBatch(1)
    ok.add_message(good)
    assert bt.open_batch(b, ok) == 1


def test_replays_rejected_within_and_across_batches() -> None:
    a, b, k1, _ = _pair()
    m = [reference_seal(k1, 0xB0B, c, b"p%d" % c) for c in range(4)]
    batch = bt.PacketBatch(8)
    for x in (m[0], m[1], m[1], m[3], m[0]):
        batch.add_message(x)
    assert bt.open_batch(b, batch) == 3
    assert batch.statuses() == [0, 0, bt.STATUS_REPLAY, 0, bt.STATUS_REPLAY]
    again = bt.PacketBatch(8)
    for x in (m[3], m[2]):
        again.add_message(x)
    assert bt.open_batch(b, again) == 1
    assert again.statuses() == [bt.STATUS_REPLAY, 0]


def test_window_edge_8128() -> None:
    _, b, k1, _ = _pair()
    top = 20000
    batch = bt.PacketBatch(4)
    for c in (top, top - WINDOW, top - WINDOW - 1):
        batch.add_message(reference_seal(k1, 0xB0B, c, b""))
    bt.open_batch(b, batch)
    assert batch.statuses() == [0, 0, bt.STATUS_REPLAY]


def test_send_counter_exhaustion() -> None:
    a, _, _, _ = _pair(send_counter=REJECT_AFTER_MESSAGES - 1)
    batch = bt.PacketBatch(3)
    for _ in range(3):
        batch.add_plaintext(b"abc")
    assert bt.seal_batch(a, batch, MTU) == 1
    assert batch.statuses() == [0, bt.STATUS_EXHAUSTED, bt.STATUS_EXHAUSTED]
    assert a.send_counter == REJECT_AFTER_MESSAGES


def test_receive_counter_limit() -> None:
    _, b, k1, _ = _pair()
    batch = bt.PacketBatch(1)
    batch.add_message(reference_seal(k1, 0xB0B, REJECT_AFTER_MESSAGES, b""))
    assert bt.open_batch(b, batch) == 0
    assert batch.statuses() == [bt.STATUS_REPLAY]


def test_bad_constructor_and_batch_input() -> None:
    with pytest.raises(ValueError):
        fp.Keypair(b"short", os.urandom(32), 1, 2)
    with pytest.raises(ValueError):
        fp.Keypair(os.urandom(32), "not bytes", 1, 2)  # type: ignore[arg-type]  # on purpose
    batch = bt.PacketBatch(1, 2048)
    with pytest.raises(ValueError):
        batch.add_plaintext(b"x" * 2048)
    batch.add_plaintext(b"x")
    with pytest.raises(IndexError):
        batch.add_plaintext(b"y")
    with pytest.raises(ValueError):
        bt.PacketBatch(0)
    a, _, _, _ = _pair()
    msg = bt.PacketBatch(1)
    msg.add_message(b"\x04" + b"\x00" * 40)
    with pytest.raises(ValueError):
        bt.seal_batch(a, msg)  # a received message is not plaintext


def test_aeadkey_single_payloads_match_reference() -> None:
    key = os.urandom(32)
    k = bt.AEADKey(key)
    for n in (0, 1, 100, 1420):
        p = os.urandom(n)
        sealed = k.seal(99, p)
        assert sealed == AEAD(key).seal(99, p)
        assert k.open(99, sealed) == p
        with pytest.raises(bt.AuthenticationError):
            k.open(98, sealed)
        with pytest.raises(AuthenticationError):
            AEAD(key).open(98, sealed)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 20000), st.integers(0, 2**64 - 1), st.integers(2**64 - 2**14, 2**64 - 1)
        ),
        max_size=200,
    )
)
def test_replay_window_matches_model(counters: list[int]) -> None:
    _, b, _, _ = _pair()
    model, python_window = ReplayModel(), ReplayWindow()
    for c in counters:
        expect = model.update(c)
        assert bt.replay_check(b, c) == expect == python_window.check(c)
        assert bt.replay_update(b, c) == expect == python_window.update(c)
