"""Encryption of what a node publishes, exactly as Talos's discovery client does it.

The key is the cluster secret (32 bytes, AES-256); the service sees only ciphertext.

- Affiliate data: AES-GCM with a fresh random 12-byte nonce, sent as
  nonce || ciphertext || tag, no associated data.
- Endpoints: deterministic, so that the service can merge identical endpoints sent by
  different nodes: ``len(pb) || pb`` zero-padded to the 16-byte block size, each block
  encrypted with bare AES (ECB). This leaks equality of endpoints, by design.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_SIZE = 16


class CipherError(ValueError):
    """Ciphertext that cannot be opened with this key (or is malformed)."""


def secret_key(secret: str | bytes) -> bytes:
    """The AES key from a cluster secret: base64 text (as in machine config) or raw bytes."""
    if isinstance(secret, str):
        try:
            key = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("cluster secret is not valid base64") from exc
    else:
        key = bytes(secret)
    if len(key) != 32:
        raise ValueError(f"cluster secret must be 32 bytes, got {len(key)}")
    return key


class AffiliateCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("AES-256 key must be 32 bytes")
        self._gcm = AESGCM(key)
        self._ecb = Cipher(algorithms.AES(key), modes.ECB())

    def seal_data(self, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        return nonce + self._gcm.encrypt(nonce, plaintext, None)

    def open_data(self, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise CipherError("affiliate data too short")
        try:
            return self._gcm.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], None)
        except InvalidTag as exc:
            raise CipherError("affiliate data does not decrypt with this secret") from exc

    def seal_endpoint(self, endpoint_pb: bytes) -> bytes:
        if len(endpoint_pb) > 255:
            raise ValueError("encoded endpoint longer than 255 bytes")
        framed = bytes([len(endpoint_pb)]) + endpoint_pb
        framed += bytes(-len(framed) % BLOCK_SIZE)
        enc = self._ecb.encryptor()
        return enc.update(framed) + enc.finalize()

    def open_endpoint(self, sealed: bytes) -> bytes:
        if not sealed or len(sealed) % BLOCK_SIZE:
            raise CipherError("endpoint size is not a multiple of the AES block size")
        dec = self._ecb.decryptor()
        framed = dec.update(sealed) + dec.finalize()
        size = framed[0]
        if size > len(framed) - 1:
            raise CipherError("endpoint length prefix exceeds its data")
        return framed[1 : 1 + size]
