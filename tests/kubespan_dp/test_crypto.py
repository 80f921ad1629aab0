"""Known-answer tests for kubespan_dp.crypto (spec vectors as named hex constants)."""

from __future__ import annotations

import pytest

from kubespan_dp import crypto

h = bytes.fromhex

# RFC 8439 §2.8.2: AEAD_CHACHA20_POLY1305 example.
RFC8439_282_KEY = h("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
RFC8439_282_NONCE = h("070000004041424344454647")
RFC8439_282_AAD = h("50515253c0c1c2c3c4c5c6c7")
RFC8439_282_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only "
    b"one tip for the future, sunscreen would be it."
)
RFC8439_282_CIPHERTEXT = h(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
RFC8439_282_TAG = h("1ae10b594f09e26a7e902ecbd0600691")

# RFC 7748 §5.2: X25519 test vectors (scalar, u-coordinate, output).
RFC7748_52_VECTORS = [
    (
        h("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
        h("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"),
        h("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ),
    (
        h("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d"),
        h("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493"),
        h("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
    ),
]
# RFC 7748 §5.2: iterated X25519 starting from k = u = 9.
RFC7748_52_ITER_1 = h("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
RFC7748_52_ITER_1000 = h("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")

# RFC 7748 §6.1: Diffie-Hellman example.
RFC7748_61_ALICE_PRIV = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_61_ALICE_PUB = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_61_BOB_PRIV = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_61_BOB_PUB = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_61_SHARED = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

# RFC 7693 Appendix B: BLAKE2s-256("abc").
RFC7693_B_ABC = h("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
# BLAKE2 reference KAT (blake2s-kat.txt): key 00..1f, 32-byte output, inputs "" and 00.
BLAKE2S_KAT_KEY = bytes(range(32))
BLAKE2S_KAT_EMPTY = h("48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49")
BLAKE2S_KAT_00 = h("40d15fee7c328830166ac3f918650f807e7e01e177258cdc0a39b11f598066f1")

# draft-irtf-cfrg-xchacha-03 §A.3.1: AEAD_XChaCha20_Poly1305.
XCHACHA_A31_KEY = RFC8439_282_KEY
XCHACHA_A31_NONCE = h("404142434445464748494a4b4c4d4e4f5051525354555657")
XCHACHA_A31_AAD = RFC8439_282_AAD
XCHACHA_A31_PLAINTEXT = RFC8439_282_PLAINTEXT
XCHACHA_A31_CIPHERTEXT = h(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
XCHACHA_A31_TAG = h("c0875924c1c7987947deafd8780acf49")

# wireguard-go device/kdf_test.go: (key, input, t0, t1, t2) for KDF1/2/3 with HMAC-BLAKE2s.
WG_KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


def test_rfc8439_aead_seal_and_open() -> None:
    sealed = crypto.chacha20poly1305_seal(
        RFC8439_282_KEY, RFC8439_282_NONCE, RFC8439_282_PLAINTEXT, RFC8439_282_AAD
    )
    assert sealed == RFC8439_282_CIPHERTEXT + RFC8439_282_TAG
    assert (
        crypto.chacha20poly1305_open(RFC8439_282_KEY, RFC8439_282_NONCE, sealed, RFC8439_282_AAD)
        == RFC8439_282_PLAINTEXT
    )
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(crypto.AuthenticationError):
        crypto.chacha20poly1305_open(
            RFC8439_282_KEY, RFC8439_282_NONCE, bytes(tampered), RFC8439_282_AAD
        )


def test_wireguard_nonce_layout() -> None:
    # 4 zero bytes then the counter little endian.
    assert crypto.nonce(0x0807060504030201) == h("000000000102030405060708")
    key = RFC8439_282_KEY
    a = crypto.AEAD(key)
    assert a.seal(5, b"x", b"ad") == crypto.chacha20poly1305_seal(key, crypto.nonce(5), b"x", b"ad")
    assert a.open(5, a.seal(5, b"x")) == b"x"
    with pytest.raises(crypto.AuthenticationError):
        a.open(6, a.seal(5, b"x"))


@pytest.mark.parametrize("scalar,u,out", RFC7748_52_VECTORS)
def test_rfc7748_x25519_vectors(scalar: bytes, u: bytes, out: bytes) -> None:
    assert crypto.dh(scalar, u) == out


def test_rfc7748_x25519_iterated() -> None:
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = crypto.dh(k, u), k
        if i == 1:
            assert k == RFC7748_52_ITER_1
    assert k == RFC7748_52_ITER_1000


def test_rfc7748_diffie_hellman() -> None:
    assert crypto.public_key(RFC7748_61_ALICE_PRIV) == RFC7748_61_ALICE_PUB
    assert crypto.public_key(RFC7748_61_BOB_PRIV) == RFC7748_61_BOB_PUB
    assert crypto.dh(RFC7748_61_ALICE_PRIV, RFC7748_61_BOB_PUB) == RFC7748_61_SHARED
    assert crypto.dh(RFC7748_61_BOB_PRIV, RFC7748_61_ALICE_PUB) == RFC7748_61_SHARED


def test_x25519_rejects_low_order_point() -> None:
    # u = 0 and u = 1 are low-order points: the shared secret would be all zero.
    for point in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(crypto.InvalidPublicKey):
            crypto.dh(RFC7748_61_ALICE_PRIV, point)


def test_rfc7693_blake2s() -> None:
    assert crypto.hash_(b"abc") == RFC7693_B_ABC
    assert crypto.hash_(b"a", b"bc") == RFC7693_B_ABC


def test_keyed_blake2s_kat() -> None:
    import hashlib

    assert hashlib.blake2s(b"", key=BLAKE2S_KAT_KEY).digest() == BLAKE2S_KAT_EMPTY
    assert hashlib.blake2s(b"\x00", key=BLAKE2S_KAT_KEY).digest() == BLAKE2S_KAT_00
    # Our MAC is the same function with a 16-byte output (a distinct parameter block).
    assert len(crypto.mac(BLAKE2S_KAT_KEY, b"")) == 16
    assert crypto.mac(BLAKE2S_KAT_KEY, b"") != BLAKE2S_KAT_EMPTY[:16]
    assert (
        crypto.mac(BLAKE2S_KAT_KEY, b"")
        == hashlib.blake2s(b"", key=BLAKE2S_KAT_KEY, digest_size=16).digest()
    )


def test_xchacha20poly1305_draft_vector() -> None:
    sealed = crypto.xaead_seal(
        XCHACHA_A31_KEY, XCHACHA_A31_NONCE, XCHACHA_A31_PLAINTEXT, XCHACHA_A31_AAD
    )
    assert sealed == XCHACHA_A31_CIPHERTEXT + XCHACHA_A31_TAG
    assert (
        crypto.xaead_open(XCHACHA_A31_KEY, XCHACHA_A31_NONCE, sealed, XCHACHA_A31_AAD)
        == XCHACHA_A31_PLAINTEXT
    )
    with pytest.raises(crypto.AuthenticationError):
        crypto.xaead_open(XCHACHA_A31_KEY, XCHACHA_A31_NONCE, sealed, b"other ad")


@pytest.mark.parametrize("key,data,t0,t1,t2", WG_KDF_VECTORS)
def test_wireguard_go_kdf_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    k, d = h(key), h(data)
    assert crypto.kdf3(k, d) == (h(t0), h(t1), h(t2))
    assert crypto.kdf2(k, d) == (h(t0), h(t1))
    assert crypto.kdf1(k, d) == h(t0)


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
