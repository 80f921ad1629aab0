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
from dataclasses import dataclass, fields

# one source with the C fast path (setup.py generates its header from constants.py)
from .constants import COOKIE_REPLY as COOKIE_REPLY
from .constants import COOKIE_REPLY_SIZE as COOKIE_REPLY_SIZE
from .constants import INITIATION as INITIATION
from .constants import INITIATION_SIZE as INITIATION_SIZE
from .constants import RESPONSE as RESPONSE
from .constants import RESPONSE_SIZE as RESPONSE_SIZE
from .constants import TRANSPORT as TRANSPORT
from .constants import TRANSPORT_HEADER_SIZE as TRANSPORT_HEADER_SIZE
from .constants import TRANSPORT_MIN_SIZE as TRANSPORT_MIN_SIZE  # header + tag: a keepalive

KEEPALIVE_SIZE = TRANSPORT_MIN_SIZE
MAX_MESSAGE_SIZE = (1 << 16) - 1  # largest UDP payload

# Offsets of the macs inside handshake messages (they always end the message).
MAC_SIZE = 16

_TRANSPORT_HEADER = struct.Struct("<IIQ")
assert _TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE


class MessageError(ValueError):
    """The datagram is not a well-formed WireGuard message."""


class _Fixed:
    """Base of the fixed-size messages; their layouts are in ``_FIXED`` below."""

    __slots__ = ()

    def encode(self) -> bytes:
        return _FIXED_BY_CLASS[type(self)].pack(self)


@dataclass(frozen=True, slots=True)
class Initiation(_Fixed):
    sender: int
    ephemeral: bytes
    static: bytes
    timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class Response(_Fixed):
    sender: int
    receiver: int
    ephemeral: bytes
    empty: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class CookieReply(_Fixed):
    receiver: int
    nonce: bytes
    cookie: bytes


@dataclass(frozen=True, slots=True)
class Transport:
    receiver: int
    counter: int
    ciphertext: bytes

    def encode(self) -> bytes:
        return _TRANSPORT_HEADER.pack(TRANSPORT, self.receiver, self.counter) + self.ciphertext


Message = Initiation | Response | CookieReply | Transport
FixedMessage = Initiation | Response | CookieReply


class _FixedCodec:
    """A fixed-size message: the u32 type, then the dataclass fields in declaration order.

    ``codes`` gives each field's struct code: "I" (a u32 index) or "<n>s" (exactly n
    bytes). Packing, unpacking and the field checks of ``encode`` all follow it.
    """

    def __init__(
        self, kind: int, message: type[FixedMessage], codes: tuple[str, ...], size: int
    ) -> None:
        self.kind = kind
        self.message = message
        self.name = message.__name__.lower()
        self.struct = struct.Struct("<I" + "".join(codes))
        assert self.struct.size == size
        self.fields = tuple(zip((f.name for f in fields(message)), codes, strict=True))

    def pack(self, msg: _Fixed) -> bytes:
        return self.struct.pack(self.kind, *(getattr(msg, name) for name, _ in self.fields))

    def unpack(self, data: bytes) -> FixedMessage:
        if len(data) != self.struct.size:
            raise MessageError(f"{self.name} must be {self.struct.size} bytes, got {len(data)}")
        return self.message(*self.struct.unpack(data)[1:])

    def check(self, msg: _Fixed) -> None:
        for name, code in self.fields:
            value = getattr(msg, name)
            if code == "I":
                _check_index(value)
            elif not isinstance(value, (bytes, bytearray)) or len(value) != int(code[:-1]):
                raise MessageError(f"{self.name} field {name} has the wrong size")


_FIXED = {
    c.kind: c
    for c in (
        _FixedCodec(
            INITIATION, Initiation, ("I", "32s", "48s", "28s", "16s", "16s"), INITIATION_SIZE
        ),
        _FixedCodec(RESPONSE, Response, ("I", "I", "32s", "16s", "16s", "16s"), RESPONSE_SIZE),
        _FixedCodec(COOKIE_REPLY, CookieReply, ("I", "24s", "32s"), COOKIE_REPLY_SIZE),
    )
}
_FIXED_BY_CLASS: dict[type[_Fixed], _FixedCodec] = {c.message: c for c in _FIXED.values()}


def _check_index(value: int) -> None:
    if not 0 <= value < 1 << 32:
        raise MessageError("index out of u32 range")


def message_type(data: bytes) -> int:
    """The message type, or MessageError if the header is not a known type."""
    if len(data) < 4:
        raise MessageError("datagram shorter than a message header")
    kind: int = struct.unpack_from("<I", data)[0]
    if kind not in (INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT):
        raise MessageError(f"unknown message type 0x{kind:08x}")
    return kind


def decode(data: bytes) -> Message:
    """Parse one datagram; raises MessageError on wrong type or size."""
    data = bytes(data)
    kind = message_type(data)
    if kind in _FIXED:
        return _FIXED[kind].unpack(data)
    if len(data) < TRANSPORT_MIN_SIZE:
        raise MessageError(f"transport message shorter than {TRANSPORT_MIN_SIZE} bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageError("transport message longer than a UDP datagram")
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return Transport(receiver, counter, data[TRANSPORT_HEADER_SIZE:])


def encode(message: Message) -> bytes:
    """Serialise a message, checking field sizes and ranges (MessageError if wrong)."""
    if isinstance(message, Transport):
        _check_index(message.receiver)
        if not 0 <= message.counter < 1 << 64:
            raise MessageError("counter out of u64 range")
        if len(message.ciphertext) < 16:
            raise MessageError("transport ciphertext shorter than a tag")
    elif isinstance(message, (Initiation, Response, CookieReply)):
        _FIXED_BY_CLASS[type(message)].check(message)
    else:
        raise MessageError(f"not a WireGuard message: {type(message).__name__}")
    return message.encode()
