"""Known-answer tests for kubespan_dp.crypto (the published vectors are in vectors.toml)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from kubespan_dp import crypto
from tests.kubespan_dp.vectors import VECTORS

h = bytes.fromhex

RFC8439 = VECTORS.rfc8439_aead
XCHACHA = VECTORS.xchacha_aead
X25519 = VECTORS.rfc7748_x25519
DH = VECTORS.rfc7748_dh
BLAKE2S = VECTORS.blake2s


@pytest.mark.parametrize(
    ("seal", "open_", "v"),
    [
        pytest.param(
            crypto.chacha20poly1305_seal, crypto.chacha20poly1305_open, RFC8439, id="rfc8439"
        ),
        pytest.param(crypto.xaead_seal, crypto.xaead_open, XCHACHA, id="xchacha-draft"),
    ],
)
def test_aead_vectors(
    seal: Callable[[bytes, bytes, bytes, bytes], bytes],
    open_: Callable[[bytes, bytes, bytes, bytes], bytes],
    v: SimpleNamespace,
) -> None:
    sealed = seal(v.key, v.nonce, v.plaintext, v.aad)
    assert sealed == v.ciphertext + v.tag
    assert open_(v.key, v.nonce, sealed, v.aad) == v.plaintext
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(crypto.AuthenticationError):
        open_(v.key, v.nonce, bytes(tampered), v.aad)
    with pytest.raises(crypto.AuthenticationError):
        open_(v.key, v.nonce, sealed, b"other ad")


def test_wireguard_nonce_layout() -> None:
    # 4 zero bytes then the counter little endian.
    assert crypto.nonce(0x0807060504030201) == h("000000000102030405060708")
    key = RFC8439.key
    a = crypto.AEAD(key)
    assert a.seal(5, b"x", b"ad") == crypto.chacha20poly1305_seal(key, crypto.nonce(5), b"x", b"ad")
    assert a.open(5, a.seal(5, b"x")) == b"x"
    with pytest.raises(crypto.AuthenticationError):
        a.open(6, a.seal(5, b"x"))


@pytest.mark.parametrize("v", X25519.vectors)
def test_rfc7748_x25519_vectors(v: SimpleNamespace) -> None:
    assert crypto.dh(v.scalar, v.u) == v.output


def test_rfc7748_x25519_iterated() -> None:
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = crypto.dh(k, u), k
        if i == 1:
            assert k == X25519.iterated_1
    assert k == X25519.iterated_1000


def test_rfc7748_diffie_hellman() -> None:
    assert crypto.public_key(DH.alice_private) == DH.alice_public
    assert crypto.public_key(DH.bob_private) == DH.bob_public
    assert crypto.dh(DH.alice_private, DH.bob_public) == DH.shared
    assert crypto.dh(DH.bob_private, DH.alice_public) == DH.shared


def test_x25519_rejects_low_order_point() -> None:
    # u = 0 and u = 1 are low-order points: the shared secret would be all zero.
    for point in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(crypto.InvalidPublicKey):
            crypto.dh(DH.alice_private, point)


def test_rfc7693_blake2s() -> None:
    assert crypto.hash_(b"abc") == BLAKE2S.abc
    assert crypto.hash_(b"a", b"bc") == BLAKE2S.abc


def test_keyed_blake2s_kat() -> None:
    import hashlib

    assert hashlib.blake2s(b"", key=BLAKE2S.kat_key).digest() == BLAKE2S.kat_empty
    assert hashlib.blake2s(b"\x00", key=BLAKE2S.kat_key).digest() == BLAKE2S.kat_00
    # Our MAC is the same function with a 16-byte output (a distinct parameter block).
    assert len(crypto.mac(BLAKE2S.kat_key, b"")) == 16
    assert crypto.mac(BLAKE2S.kat_key, b"") != BLAKE2S.kat_empty[:16]
    assert (
        crypto.mac(BLAKE2S.kat_key, b"")
        == hashlib.blake2s(b"", key=BLAKE2S.kat_key, digest_size=16).digest()
    )


@pytest.mark.parametrize("v", VECTORS.wireguard_go_kdf)
def test_wireguard_go_kdf_vectors(v: SimpleNamespace) -> None:
    assert crypto.kdf3(v.key, v.input) == (v.t0, v.t1, v.t2)
    assert crypto.kdf2(v.key, v.input) == (v.t0, v.t1)
    assert crypto.kdf1(v.key, v.input) == v.t0


def test_tai64n_encoding_and_order() -> None:
    # 1970-01-01T00:00:00 is TAI64 label 2^62 + 10.
    assert crypto.tai64n(0.0) == h("400000000000000a00000000")
    ts = crypto.tai64n(1_700_000_000.5)
    assert ts[:8] == (0x400000000000000A + 1_700_000_000).to_bytes(8, "big")
    nanos = int.from_bytes(ts[8:], "big")
    assert nanos <= 500_000_000 and nanos % (1 << 24) == 0  # whitened
    assert crypto.tai64n_after(crypto.tai64n(2.0), crypto.tai64n(1.0))
    assert not crypto.tai64n_after(crypto.tai64n(1.0), crypto.tai64n(1.0))
    # Within one whitening slot (2^24 ns) two stamps are equal, so not "after".
    assert not crypto.tai64n_after(crypto.tai64n(1.001), crypto.tai64n(1.0))
