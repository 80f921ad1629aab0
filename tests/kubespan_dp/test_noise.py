"""Noise_IKpsk2 transcript checks: the generic vector and a fixed-key WireGuard initiation."""

from __future__ import annotations

import pytest

from kubespan_dp import crypto, messages, noise
from tests.kubespan_dp.vectors import VECTORS

h = bytes.fromhex

CACO = VECTORS.cacophony_ikpsk2  # Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s


def test_cacophony_ikpsk2_transcript() -> None:
    assert crypto.public_key(CACO.resp_static) == CACO.init_remote_static
    # Initiator writes message 0.
    ini = noise.SymmetricState(*noise.initial_state(CACO.prologue))
    payload0, expect0 = CACO.messages[0].payload, CACO.messages[0].ciphertext
    e_pub, enc_s, enc_p = noise.write_first(
        ini, CACO.init_static, CACO.init_remote_static, CACO.init_ephemeral, payload0
    )
    assert e_pub + enc_s + enc_p == expect0

    # Responder reads it.
    res = noise.SymmetricState(*noise.initial_state(CACO.prologue))
    rs = noise.read_first_static(res, CACO.resp_static, expect0[:32], expect0[32:80])
    assert rs == crypto.public_key(CACO.init_static)
    got = noise.read_first_payload(res, crypto.dh(CACO.resp_static, rs), expect0[80:])
    assert got == payload0
    assert (res.ck, res.h) == (ini.ck, ini.h)

    # Responder writes message 1; initiator reads it.
    payload1, expect1 = CACO.messages[1].payload, CACO.messages[1].ciphertext
    re_pub, enc_p1 = noise.write_second(res, CACO.resp_ephemeral, e_pub, rs, CACO.psk, payload1)
    assert re_pub + enc_p1 == expect1
    assert (
        noise.read_second(
            ini, CACO.init_ephemeral, CACO.init_static, expect1[:32], CACO.psk, expect1[32:]
        )
        == payload1
    )
    assert ini.h == res.h == CACO.handshake_hash

    # Transport: initiator->responder with key 1, back with key 2, counters from 0.
    i2r, r2i = noise.split(ini.ck)
    assert noise.split(res.ck) == (i2r, r2i)
    counters = {True: 0, False: 0}
    for n, message in enumerate(CACO.messages[2:]):
        from_initiator = n % 2 == 0
        key = i2r if from_initiator else r2i
        sealed = crypto.aead_seal(key, counters[from_initiator], message.payload, b"")
        assert sealed == message.ciphertext
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
    ki, kr = noise.derive_keypair(hi, 1.0), noise.derive_keypair(hr, 2.0)
    assert ki.is_initiator and not kr.is_initiator
    assert ki.send_key == kr.receive_key and ki.receive_key == kr.send_key
    assert (ki.created, kr.created) == (1.0, 2.0)
    assert (ki.local_index, ki.remote_index) == (WG_SENDER, 0x55667788)
    assert (kr.local_index, kr.remote_index) == (0x55667788, WG_SENDER)
    assert hi.ck == bytes(32) and hi.state is noise.HandshakeState.ZEROED


def test_replayed_initiation_and_wrong_psk_rejected() -> None:
    hi, hr = _handshakes()
    wire = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, 1).encode()
    lookup = lambda pk: (None, hr)  # noqa: E731
    noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lookup, 0.0).commit()
    with pytest.raises(noise.HandshakeError, match="replay") as err:
        noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lookup, 100.0)
    assert err.value.reason is noise.Reason.REPLAY
    # A newer timestamp within 20 ms of the last consumption is a flood.
    hi2, _ = _handshakes()
    newer = noise.create_initiation(
        hi2, WG_INIT_PRIV, WG_EPHEMERAL, crypto.tai64n(1_700_000_001.0), 2
    ).encode()
    with pytest.raises(noise.HandshakeError, match="flood") as err:
        noise.consume_initiation(_decode_initiation(newer), WG_RESP_PRIV, lookup, 0.01)
    assert err.value.reason is noise.Reason.FLOOD
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
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_response(resp, hi, WG_INIT_PRIV)
    assert err.value.reason is noise.Reason.INVALID_RESPONSE
    assert (hi.ck, hi.h, hi.state) == before


def test_initiation_from_unknown_key_rejected() -> None:
    hi, _ = _handshakes()
    wire = noise.create_initiation(hi, WG_INIT_PRIV, WG_EPHEMERAL, WG_TIMESTAMP, 1).encode()
    with pytest.raises(noise.HandshakeError, match="unknown") as err:
        noise.consume_initiation(_decode_initiation(wire), WG_RESP_PRIV, lambda pk: None, 0.0)
    assert err.value.reason is noise.Reason.UNKNOWN_PEER
    # Encrypted to someone else's static key: the static field does not decrypt.
    with pytest.raises(noise.HandshakeError) as err:
        noise.consume_initiation(_decode_initiation(wire), WG_INIT_PRIV, lambda pk: None, 0.0)
    assert err.value.reason is noise.Reason.INVALID_INITIATION


def test_index_table_unique_random() -> None:
    seq = iter([b"\x01\0\0\0", b"\x01\0\0\0", b"\x02\0\0\0"])
    table: noise.IndexTable[str] = noise.IndexTable(rng=lambda n: next(seq))
    assert table.new_index("a") == 1
    assert table.new_index("b") == 2  # the duplicate draw was skipped
    assert table.get(1) == "a"
    table.delete(1)
    assert table.get(1) is None and len(table) == 1
