"""Base62 as github.com/jxskiss/base62 encodes it (Talos node ids use it).

Not a big-number base conversion: the bit string is consumed 6 bits at a time from its
least significant end; a 6-bit group whose bits 1-4 are all set (values 30, 31, 62, 63)
can't be a digit (only 62 symbols), so just its low 5 bits are emitted and consumed.
"""

from __future__ import annotations

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_COMPACT = 0x1E


def encode(data: bytes) -> str:
    n, remaining = int.from_bytes(data, "big"), len(data) * 8
    out = []
    while remaining > 0:
        b, size = n & 0x3F, 6
        if b & _COMPACT == _COMPACT:
            if remaining > 6 or b > 0x1F:
                size = 5
            b &= 0x1F
        out.append(ALPHABET[b])
        n >>= size
        remaining -= size
    return "".join(out)


def decode(text: str) -> bytes:
    n = shift = 0
    for i, ch in enumerate(text):
        if ch not in _INDEX:
            raise ValueError(f"illegal base62 data at input byte {i}")
        x = _INDEX[ch]
        n |= x << shift
        if i == len(text) - 1:
            shift += x.bit_length()
        else:
            shift += 5 if x & _COMPACT == _COMPACT else 6
    return n.to_bytes((shift + 7) // 8, "big")
