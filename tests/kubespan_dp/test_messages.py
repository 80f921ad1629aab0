"""Codecs of the four WireGuard messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan_dp import messages as m


def test_roundtrip_and_sizes() -> None:
    init = m.Initiation(7, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    resp = m.Response(8, 9, b"e" * 32, b"x" * 16, b"1" * 16, b"2" * 16)
    cookie = m.CookieReply(10, b"n" * 24, b"c" * 32)
    data = m.Transport(11, 2**64 - 1, b"z" * 16)
    for msg, size in ((init, 148), (resp, 92), (cookie, 64), (data, 32)):
        wire = m.encode(msg)
        assert len(wire) == size
        assert m.decode(wire) == msg
    assert m.encode(init)[:4] == b"\x01\x00\x00\x00"
    assert m.encode(data)[8:16] == b"\xff" * 8


@pytest.mark.parametrize("kind,size", [(1, 148), (2, 92), (3, 64)])
def test_wrong_size_rejected(kind: int, size: int) -> None:
    for n in (size - 1, size + 1, 4):
        with pytest.raises(m.MessageError):
            m.decode(bytes([kind, 0, 0, 0]) + bytes(n - 4))


def test_transport_too_short_and_reserved_bytes() -> None:
    with pytest.raises(m.MessageError):
        m.decode(b"\x04\0\0\0" + bytes(27))
    assert isinstance(m.decode(b"\x04\0\0\0" + bytes(28)), m.Transport)
    for reserved in range(1, 4):
        wire = bytearray(b"\x04\0\0\0" + bytes(28))
        wire[reserved] = 1
        with pytest.raises(m.MessageError):
            m.decode(bytes(wire))
    for bad in (b"", b"\x01", b"\x00\0\0\0" + bytes(60), b"\x05\0\0\0" + bytes(60)):
        with pytest.raises(m.MessageError):
            m.decode(bad)


def test_encode_checks_fields() -> None:
    with pytest.raises(m.MessageError):
        m.encode(m.Initiation(1, b"short", b"s" * 48, b"t" * 28))
    with pytest.raises(m.MessageError):
        m.encode(m.Transport(2**32, 0, bytes(16)))
    with pytest.raises(m.MessageError):
        m.encode(m.Transport(1, 0, bytes(15)))


@given(st.binary(max_size=300))
def test_decode_never_raises_anything_but_message_error(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except m.MessageError:
        return
    assert m.encode(msg) == data
