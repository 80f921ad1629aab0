"""Cryptographic primitives of WireGuard (whitepaper §5.4), as plain functions.

Everything here works on raw ``bytes``. The AEAD helpers raise
``AuthenticationError`` when a tag does not verify, so callers can treat any
failure as "drop the datagram".
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl
from nacl.exceptions import CryptoError

KEY_LEN = 32
HASH_LEN = 32
MAC_LEN = 16
TAG_LEN = 16
TAI64N_LEN = 12
XNONCE_LEN = 24

# TAI64N label for 1970 (2^62 + 10 leap seconds), as wireguard-go's tai64n package.
_TAI64_BASE = 0x400000000000000A
# wireguard-go rounds nanoseconds down to 2^24 ns so a timestamp leaks little
# about the local clock and initiations cannot be replayed within that slot.
_TAI64N_WHITENER = 0x1000000 - 1


class AuthenticationError(ValueError):
    """An AEAD tag did not verify."""


class InvalidPublicKey(ValueError):
    """An X25519 exchange gave the all-zero result (a low-order point)."""


# --- hashing -----------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...) = BLAKE2s-256."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, *parts: bytes) -> bytes:
    """MAC(key, input) = keyed BLAKE2s with a 16-byte output."""
    h = hashlib.blake2s(key=key, digest_size=MAC_LEN)
    for p in parts:
        h.update(p)
    return h.digest()


def hmac_(key: bytes, *parts: bytes) -> bytes:
    """HMAC(key, input) with BLAKE2s-256 (RFC 2104 construction, 64-byte block)."""
    h = hmac.new(key, digestmod=hashlib.blake2s)
    for p in parts:
        h.update(p)
    return h.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac_(key, data)
    return hmac_(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_(key, data)
    t0 = hmac_(prk, b"\x01")
    t1 = hmac_(prk, t0, b"\x02")
    return t0, t1


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_(key, data)
    t0 = hmac_(prk, b"\x01")
    t1 = hmac_(prk, t0, b"\x02")
    t2 = hmac_(prk, t1, b"\x03")
    return t0, t1, t2


# --- X25519 ------------------------------------------------------------------


def clamp(private_key: bytes) -> bytes:
    k = bytearray(private_key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key(rng_bytes: bytes) -> bytes:
    """A clamped private key from 32 random bytes (the caller owns the RNG)."""
    if len(rng_bytes) != KEY_LEN:
        raise ValueError("need 32 random bytes")
    return clamp(rng_bytes)


def public_key(private_key: bytes) -> bytes:
    if len(private_key) != KEY_LEN:
        raise ValueError("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def dh(private_key: bytes, peer_public: bytes) -> bytes:
    """X25519(private, public); raises InvalidPublicKey on an all-zero result."""
    if len(private_key) != KEY_LEN or len(peer_public) != KEY_LEN:
        raise ValueError("X25519 keys must be 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # OpenSSL refuses low-order points itself
        raise InvalidPublicKey("X25519 result is all zero") from exc
    if not any(shared):
        raise InvalidPublicKey("X25519 result is all zero")
    return shared


# --- AEADs -------------------------------------------------------------------


def nonce(counter: int) -> bytes:
    """WireGuard's 96-bit nonce: 4 zero bytes then the counter, little endian."""
    return b"\x00\x00\x00\x00" + struct.pack("<Q", counter)


def chacha20poly1305_seal(key: bytes, nonce12: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """RFC 8439 AEAD with an explicit 96-bit nonce; returns ciphertext || tag."""
    return ChaCha20Poly1305(key).encrypt(nonce12, plaintext, ad or None)


def chacha20poly1305_open(key: bytes, nonce12: bytes, sealed: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce12, sealed, ad or None)
    except InvalidTag:
        raise AuthenticationError("ChaCha20-Poly1305 tag mismatch") from None


class AEAD:
    """ChaCha20-Poly1305 (RFC 8439) under one key, made once and reused."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("ChaCha20-Poly1305 key must be 32 bytes")
        self._aead = ChaCha20Poly1305(key)

    def seal(self, counter: int, plaintext: bytes, ad: bytes = b"") -> bytes:
        return self._aead.encrypt(nonce(counter), plaintext, ad or None)

    def open(self, counter: int, ciphertext: bytes, ad: bytes = b"") -> bytes:
        try:
            return self._aead.decrypt(nonce(counter), ciphertext, ad or None)
        except InvalidTag:
            raise AuthenticationError("ChaCha20-Poly1305 tag mismatch") from None


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return AEAD(key).seal(counter, plaintext, ad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    return AEAD(key).open(counter, ciphertext, ad)


def xaead_seal(key: bytes, xnonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha) with a 24-byte nonce."""
    if len(key) != KEY_LEN or len(xnonce) != XNONCE_LEN:
        raise ValueError("XChaCha20-Poly1305 needs a 32-byte key and 24-byte nonce")
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, xnonce, key)


def xaead_open(key: bytes, xnonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    if len(key) != KEY_LEN or len(xnonce) != XNONCE_LEN:
        raise ValueError("XChaCha20-Poly1305 needs a 32-byte key and 24-byte nonce")
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, xnonce, key)
    except CryptoError:
        raise AuthenticationError("XChaCha20-Poly1305 tag mismatch") from None


# --- TAI64N ------------------------------------------------------------------


def tai64n(unix_time: float) -> bytes:
    """12-byte TAI64N label of a wall-clock time, whitened like wireguard-go."""
    secs = int(unix_time // 1)
    nanos = int(round((unix_time - secs) * 1e9))
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, nanos - 1_000_000_000
    nanos &= ~_TAI64N_WHITENER
    return struct.pack(">QI", _TAI64_BASE + secs, nanos)


def tai64n_after(a: bytes, b: bytes) -> bool:
    """True if timestamp a is strictly later than b (big-endian byte order)."""
    return a > b


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
