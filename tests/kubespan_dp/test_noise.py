"""Noise_IKpsk2 transcript checks: the generic vector and a fixed-key WireGuard initiation."""

from __future__ import annotations

import pytest

from kubespan_dp import crypto, messages, noise

h = bytes.fromhex

# snow crate, tests/vectors/cacophony.txt: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s.
CACO_PROLOGUE = h("4a6f686e2047616c74")
CACO_PSK = h("54686973206973206d7920417573747269616e20706572737065637469766521")
CACO_INIT_STATIC = h("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
CACO_INIT_EPHEMERAL = h("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
CACO_INIT_REMOTE_STATIC = h("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62")
CACO_RESP_STATIC = h("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
CACO_RESP_EPHEMERAL = h("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
CACO_HANDSHAKE_HASH = h("f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5")
CACO_MESSAGES = [  # (payload, ciphertext); 0 and 1 are the handshake, then transport
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad5752"
        "7207feb56253c9c94a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c84831215f2441"
        "eba616548e832985464cf17e51ee93109008399a21f7e13f",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f007572"
        "dab0322217755c0632f365717edbf34d33e87a",
    ),
    ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
    ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
    (
        "4a65616e2d426170746973746520536179",
        "6ab1467c0448cc78394494abaaf23afce0e234315d6e2624dcbfa8a21c1c4d073d",
    ),
    (
        "457567656e2042f6686d20766f6e2042617765726b",
        "dfc346c0d2296ae6cf1acf6f12b8456a1dba228cf8d8b774aacf1c47fc53aa80ebc7a4c292",
    ),
]


def test_cacophony_ikpsk2_transcript() -> None:
    assert crypto.public_key(CACO_RESP_STATIC) == CACO_INIT_REMOTE_STATIC
    # Initiator writes message 0.
    ini = noise.SymmetricState(*noise.initial_state(CACO_PROLOGUE))
    payload0, expect0 = (h(x) for x in CACO_MESSAGES[0])
    e_pub, enc_s, enc_p = noise.write_first(
        ini, CACO_INIT_STATIC, CACO_INIT_REMOTE_STATIC, CACO_INIT_EPHEMERAL, payload0
    )
    assert e_pub + enc_s + enc_p == expect0

    # Responder reads it.
    res = noise.SymmetricState(*noise.initial_state(CACO_PROLOGUE))
    rs = noise.read_first_static(res, CACO_RESP_STATIC, expect0[:32], expect0[32:80])
    assert rs == crypto.public_key(CACO_INIT_STATIC)
    got = noise.read_first_payload(res, crypto.dh(CACO_RESP_STATIC, rs), expect0[80:])
    assert got == payload0
    assert (res.ck, res.h) == (ini.ck, ini.h)

    # Responder writes message 1; initiator reads it.
    payload1, expect1 = (h(x) for x in CACO_MESSAGES[1])
    re_pub, enc_p1 = noise.write_second(res, CACO_RESP_EPHEMERAL, e_pub, rs, CACO_PSK, payload1)
    assert re_pub + enc_p1 == expect1
    assert (
        noise.read_second(
            ini, CACO_INIT_EPHEMERAL, CACO_INIT_STATIC, expect1[:32], CACO_PSK, expect1[32:]
        )
        == payload1
    )
    assert ini.h == res.h == CACO_HANDSHAKE_HASH

    # Transport: initiator->responder with key 1, back with key 2, counters from 0.
    i2r, r2i = noise.split(ini.ck)
    assert noise.split(res.ck) == (i2r, r2i)
    counters = {True: 0, False: 0}
    for n, (payload, expect) in enumerate(CACO_MESSAGES[2:]):
        from_initiator = n % 2 == 0
        key = i2r if from_initiator else r2i
        sealed = crypto.aead_seal(key, counters[from_initiator], h(payload), b"")
        assert sealed == h(expect)
        counters[from_initiator] += 1


# A fixed-key WireGuard initiation (keys, ephemeral, timestamp and index injected).
WG_INIT_PRIV = crypto.clamp(bytes(range(1, 33)))
WG_RESP_PRIV = crypto.clamp(bytes(range(101, 133)))
WG_EPHEMERAL = crypto.clamp(bytes(range(201, 233)))
WG_PSK = bytes(range(50, 82))
WG_TIMESTAMP = crypto.tai64n(1_700_000_000.0)
WG_SENDER = 0x11223344


def _handshakes() -> tuple[noise.Handshake, noise.Handshake]:
    init_pub, resp_pub = crypto.public_key(WG_INIT_PRIV), crypto.public_key(WG_RESP_PRIV)
    hi = noise.Handshake(remote_static=resp_pub, preshared_key=WG_PSK)
    hi.precompute(WG_INIT_PRIV)
    hr = noise.Handshake(remote_static=init_pub, preshared_key=WG_PSK)
    hr.precompute(WG_RESP_PRIV)
    return hi, hr


def _decode_initiation(wire: bytes) -> messages.Initiation:
    decoded = messages.decode(wire)
    assert isinstance(decoded, messages.Initiation)
    return decoded


def test_fixed_key_wireguard_initiation_roundtrip() -> None:
    hi, hr = _handshakes()
    msg = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, WG_SENDER)
    wire = msg.encode()
    assert len(wire) == messages.INITIATION_SIZE
    assert wire[:8] == h("01000000") + WG_SENDER.to_bytes(4, "little")
    assert wire[8:40] == crypto.public_key(WG_EPHEMERAL)

    # The same bytes follow from the generic Noise machinery with the WireGuard prologue.
    st = noise.SymmetricState(*noise.initial_state(noise.IDENTIFIER))
    e, s, t = noise.write_first(
        st, WG_INIT_PRIV, crypto.public_key(WG_RESP_PRIV), WG_EPHEMERAL, WG_TIMESTAMP
    )
    assert wire[8 : 148 - 32] == e + s + t
    assert (hi.ck, hi.h) == (st.ck, st.h)

    decoded = messages.decode(wire)
    assert isinstance(decoded, messages.Initiation)
    init_pub = crypto.public_key(WG_INIT_PRIV)
    peer_obj = object()
    consumed = noise.consume_initiation(
        decoded, WG_RESP_PRIV, lambda pk: (peer_obj, hr) if pk == init_pub else None, now=10.0
    )
    assert consumed.peer is peer_obj and consumed.timestamp == WG_TIMESTAMP
    assert hr.state is noise.HandshakeState.ZEROED  # nothing applied before commit
    consumed.commit()
    assert hr.state is noise.HandshakeState.INITIATION_CONSUMED
    assert hr.remote_index == WG_SENDER and hr.last_timestamp == WG_TIMESTAMP

    resp = noise.create_response(hr, crypto.clamp(bytes(range(7, 39))), 0x55667788)
    resp_decoded = messages.decode(resp.encode())
    assert isinstance(resp_decoded, messages.Response)
    assert resp_decoded.receiver == WG_SENDER
    noise.consume_response(resp_decoded, hi, WG_INIT_PRIV).commit()
    ki, kr = noise.derive_keypair(hi), noise.derive_keypair(hr)
    assert ki.is_initiator and not kr.is_initiator
    assert ki.send == kr.receive and ki.receive == kr.send
    assert (ki.local_index, ki.remote_index) == (WG_SENDER, 0x55667788)
    assert (kr.local_index, kr.remote_index) == (0x55667788, WG_SENDER)
    assert hi.ck == bytes(32) and hi.state is noise.HandshakeState.ZEROED


def test_replayed_initiation_and_wrong_psk_rejected() -> None:
    hi, hr = _handshakes()
    wire = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, 1).encode()
    lookup = lambda pk: (None, hr)  # noqa: E731
    noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lookup, 0.0).commit()
    with pytest.raises(noise.HandshakeError, match="replay"):
        noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lookup, 100.0)
    # A newer timestamp within 20 ms of the last consumption is a flood.
    hi2, _ = _handshakes()
    newer = noise.create_initiation(
        hi2, WG_INIT_PRIV, WG_EPHEMERAL, crypto.tai64n(1_700_000_001.0), 2
    ).encode()
    with pytest.raises(noise.HandshakeError, match="flood"):
        noise.consume_initiation(_decode_initiation(newer), WG_RESP_PRIV, lookup, 0.01)
    noise.consume_initiation(_decode_initiation(newer), WG_RESP_PRIV, lookup, 0.5)

    # Different PSKs: the response does not authenticate.
    hi, hr = _handshakes()
    hr.preshared_key = bytes(32)
    wire = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, 3).encode()
    noise.consume_initiation(
        _decode_initiation(wire), WG_RESP_PRIV, lambda pk: (None, hr), 0.0
    ).commit()
    resp = noise.create_response(hr, crypto.clamp(bytes(range(9, 41))), 4)
    before = (hi.ck, hi.h, hi.state)
    with pytest.raises(noise.HandshakeError):
        noise.consume_response(resp, hi, WG_INIT_PRIV)
    assert (hi.ck, hi.h, hi.state) == before


def test_initiation_from_unknown_key_rejected() -> None:
    hi, _ = _handshakes()
    wire = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, 1).encode()
    with pytest.raises(noise.HandshakeError, match="unknown"):
        noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lambda pk: None, 0.0)
    # Encrypted to someone else's static key: the static field does not decrypt.
    with pytest.raises(noise.HandshakeError):
        noise.consume_initiation(_decode_initiation(wire), WG_INIT_PRIV, lambda pk: None, 0.0)


def test_index_table_unique_random() -> None:
    seq = iter([b"\x01\0\0\0", b"\x01\0\0\0", b"\x02\0\0\0"])
    table: noise.IndexTable[str] = noise.IndexTable(rng=lambda n: next(seq))
    assert table.new_index("a") == 1
    assert table.new_index("b") == 2  # the duplicate draw was skipped
    assert table.get(1) == "a"
    table.delete(1)
    assert table.get(1) is None and len(table) == 1
