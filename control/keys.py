"""WireGuard keys: generation, derivation and the base64 text form used in config files."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SIZE = 32


class KeyError_(ValueError):
    """A key that is not base64 of exactly 32 bytes."""


def clamp(key: bytes) -> bytes:
    """X25519 clamping, applied to stored private keys as `wg genkey` does."""
    k = bytearray(key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_SIZE))


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: str) -> bytes:
    """Base64 text -> 32 raw bytes; the message never echoes the text (it may be secret)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise KeyError_("key is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise KeyError_(f"key decodes to {len(raw)} bytes, expected {KEY_SIZE}")
    return raw
