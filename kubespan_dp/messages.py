"""Wire formats of the four WireGuard messages.

Every message starts with a little-endian u32 whose low byte is the type and
whose three high bytes are reserved and must be zero; reading the whole u32
(as wireguard-go does) makes a non-zero reserved byte an unknown type.

    1 initiation   148 B  type sender ephemeral static(32+16) timestamp(12+16) mac1 mac2
    2 response      92 B  type sender receiver ephemeral empty(0+16) mac1 mac2
    3 cookie reply  64 B  type receiver nonce(24) cookie(16+16)
    4 transport   >=32 B  type receiver counter(u64) ciphertext(len+16)

``decode`` raises ``MessageError`` for anything that is not one of these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

INITIATION = 1
RESPONSE = 2
COOKIE_REPLY = 3
TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = 32  # header + Poly1305 tag: a keepalive
KEEPALIVE_SIZE = TRANSPORT_MIN_SIZE
MAX_MESSAGE_SIZE = (1 << 16) - 1  # largest UDP payload

# Offsets of the macs inside handshake messages (they always end the message).
MAC_SIZE = 16

_INIT = struct.Struct("<II32s48s28s16s16s")
_RESP = struct.Struct("<III32s16s16s16s")
_COOKIE = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")
assert _INIT.size == INITIATION_SIZE and _RESP.size == RESPONSE_SIZE
assert _COOKIE.size == COOKIE_REPLY_SIZE and _TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE


class MessageError(ValueError):
    """The datagram is not a well-formed WireGuard message."""


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    static: bytes
    timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def encode(self) -> bytes:
        return _INIT.pack(
            INITIATION,
            self.sender,
            self.ephemeral,
            self.static,
            self.timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    empty: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def encode(self) -> bytes:
        return _RESP.pack(
            RESPONSE, self.sender, self.receiver, self.ephemeral, self.empty, self.mac1, self.mac2
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    cookie: bytes

    def encode(self) -> bytes:
        return _COOKIE.pack(COOKIE_REPLY, self.receiver, self.nonce, self.cookie)


@dataclass(frozen=True, slots=True)
class Transport:
    receiver: int
    counter: int
    ciphertext: bytes

    def encode(self) -> bytes:
        return _TRANSPORT_HEADER.pack(TRANSPORT, self.receiver, self.counter) + self.ciphertext


Message = Initiation | Response | CookieReply | Transport


def _check_fields(*fields_and_sizes: tuple[bytes, int]) -> None:
    for value, size in fields_and_sizes:
        if not isinstance(value, (bytes, bytearray)) or len(value) != size:
            raise MessageError("field has the wrong size")


def message_type(data: bytes) -> int:
    """The message type, or MessageError if the header is not a known type."""
    if len(data) < 4:
        raise MessageError("datagram shorter than a message header")
    (kind,) = struct.unpack_from("<I", data)
    if kind not in (INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT):
        raise MessageError(f"unknown message type 0x{kind:08x}")
    return kind


def decode(data: bytes) -> Message:
    """Parse one datagram; raises MessageError on wrong type or size."""
    data = bytes(data)
    kind = message_type(data)
    if kind == INITIATION:
        if len(data) != INITIATION_SIZE:
            raise MessageError(f"initiation must be {INITIATION_SIZE} bytes, got {len(data)}")
        _, sender, eph, static, ts, mac1, mac2 = _INIT.unpack(data)
        return Initiation(sender, eph, static, ts, mac1, mac2)
    if kind == RESPONSE:
        if len(data) != RESPONSE_SIZE:
            raise MessageError(f"response must be {RESPONSE_SIZE} bytes, got {len(data)}")
        _, sender, receiver, eph, empty, mac1, mac2 = _RESP.unpack(data)
        return Response(sender, receiver, eph, empty, mac1, mac2)
    if kind == COOKIE_REPLY:
        if len(data) != COOKIE_REPLY_SIZE:
            raise MessageError(f"cookie reply must be {COOKIE_REPLY_SIZE} bytes, got {len(data)}")
        _, receiver, nonce, cookie = _COOKIE.unpack(data)
        return CookieReply(receiver, nonce, cookie)
    if len(data) < TRANSPORT_MIN_SIZE:
        raise MessageError(f"transport message shorter than {TRANSPORT_MIN_SIZE} bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageError("transport message longer than a UDP datagram")
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return Transport(receiver, counter, data[TRANSPORT_HEADER_SIZE:])


def encode(message: Message) -> bytes:
    """Serialise a message, checking field sizes (MessageError if wrong)."""
    if isinstance(message, Initiation):
        _check_fields(
            (message.ephemeral, 32),
            (message.static, 48),
            (message.timestamp, 28),
            (message.mac1, 16),
            (message.mac2, 16),
        )
    elif isinstance(message, Response):
        _check_fields(
            (message.ephemeral, 32), (message.empty, 16), (message.mac1, 16), (message.mac2, 16)
        )
    elif isinstance(message, CookieReply):
        _check_fields((message.nonce, 24), (message.cookie, 32))
    elif isinstance(message, Transport):
        if len(message.ciphertext) < 16:
            raise MessageError("transport ciphertext shorter than a tag")
    else:
        raise MessageError(f"not a WireGuard message: {type(message).__name__}")
    for index in _indices(message):
        if not 0 <= index < 1 << 32:
            raise MessageError("index out of u32 range")
    if isinstance(message, Transport) and not 0 <= message.counter < 1 << 64:
        raise MessageError("counter out of u64 range")
    return message.encode()


def _indices(message: Message) -> tuple[int, ...]:
    if isinstance(message, Initiation):
        return (message.sender,)
    if isinstance(message, Response):
        return (message.sender, message.receiver)
    return (message.receiver,)
